"""The preprocessing contract shared by training and the device.

Training calls `prepare_cell` on every single-cell image (C-NMC style: the
cell on a black background); the device calls `crop_cell` on each white cell
found in a field, which builds the same kind of image and then goes through the
same `prepare_cell`. Both end at uint8 RGB 0-255 of the bundle's input size:
Keras EfficientNet normalizes inside its graph, so nothing here normalizes
(normalizing twice is a silent accuracy killer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from device.imaging import check_rgb

_INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


@dataclass(frozen=True)
class PreprocessContract:
    input_size: int = 300
    """Side of the square uint8 RGB image the model takes."""
    crop_padding: float = 0.15
    """Margin added on each side of a found cell's box, as a fraction of the box's longer side."""
    background: str = "black"
    """"black" sets pixels outside the cell mask to 0 (as in C-NMC images); "keep" leaves the smear."""
    interpolation: str = "area"
    """Resize filter: "area" (default, best for shrinking), "linear" or "cubic"."""

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {self.input_size}")
        if not 0 <= self.crop_padding <= 1:
            raise ValueError(f"crop_padding must be in [0, 1], got {self.crop_padding}")
        if self.background not in ("black", "keep"):
            raise ValueError(f"background must be 'black' or 'keep', got {self.background!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessContract:
        return cls(**data)


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """Centre an image on a black square canvas (no resampling)."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    if h == w:
        return rgb
    out = np.zeros((side, side, 3), dtype=np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = rgb
    return out


def prepare_cell(rgb: np.ndarray, contract: PreprocessContract) -> np.ndarray:
    """Turn a single-cell image into the model's input.

    Args:
        rgb: uint8 RGB HxWx3, one cell (any size, any aspect ratio).
        contract: the bundle's preprocessing contract.

    Returns:
        uint8 RGB array of shape (input_size, input_size, 3), values 0-255.
    """
    check_rgb(rgb, "cell image")
    square = pad_to_square(rgb)
    size = contract.input_size
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    # Area averaging only makes sense for shrinking; enlarging uses linear.
    interp = _INTERPOLATIONS[contract.interpolation]
    if square.shape[0] < size and interp == cv2.INTER_AREA:
        interp = cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


def crop_cell(
    field: np.ndarray,
    box: tuple[int, int, int, int],
    mask: np.ndarray | None,
    contract: PreprocessContract,
) -> np.ndarray:
    """Cut one white cell out of a field and prepare it like a training image.

    Args:
        field: uint8 RGB field image.
        box: (x0, y0, x1, y1) of the whole cell, x1/y1 exclusive.
        mask: bool array of the box's shape, True on the cell; None means no mask.
        contract: the bundle's preprocessing contract.

    Returns:
        uint8 RGB (input_size, input_size, 3).
    """
    check_rgb(field, "field")
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty cell box {box}")
    cell = field[y0:y1, x0:x1].copy()
    if contract.background == "black" and mask is not None:
        if mask.shape != cell.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match box {box}")
        cell[~mask.astype(bool)] = 0
    bw, bh = x1 - x0, y1 - y0
    pad = int(round(max(bw, bh) * contract.crop_padding))
    side = max(bw, bh) + 2 * pad
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    if contract.background == "keep":
        # Take the real surroundings where the field has them, black beyond its edge.
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        sx0, sy0 = cx - side // 2, cy - side // 2
        fx0, fy0 = max(sx0, 0), max(sy0, 0)
        fx1, fy1 = min(sx0 + side, field.shape[1]), min(sy0 + side, field.shape[0])
        canvas[fy0 - sy0 : fy1 - sy0, fx0 - sx0 : fx1 - sx0] = field[fy0:fy1, fx0:fx1]
    else:
        oy, ox = (side - bh) // 2, (side - bw) // 2
        canvas[oy : oy + bh, ox : ox + bw] = cell
    return prepare_cell(canvas, contract)
