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
    crop_um: float | None = None
    """Side of the model's input in micrometres (the training images' field of view). When set,
    the device cuts this much of the field around each cell, so a cell reaches the model at the
    size it had in training; None (older bundles) scales each cell's box to the input instead."""

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {self.input_size}")
        if not 0 <= self.crop_padding <= 1:
            raise ValueError(f"crop_padding must be in [0, 1], got {self.crop_padding}")
        if self.background not in ("black", "keep"):
            raise ValueError(f"background must be 'black' or 'keep', got {self.background!r}")
        if self.crop_um is not None and not 2.0 <= self.crop_um <= 200.0:
            raise ValueError(f"crop_um must be between 2 and 200 micrometres, got {self.crop_um}")
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


def prepare_cell(rgb: np.ndarray, contract: PreprocessContract, um_per_px: float | None = None) -> np.ndarray:
    """Turn a single-cell image into the model's input.

    Args:
        rgb: uint8 RGB HxWx3, one cell (any size, any aspect ratio).
        contract: the bundle's preprocessing contract.
        um_per_px: the image's pixel size. With it and `contract.crop_um`, the image is centred on a
            black square of crop_um micrometres (cut to it when larger), so every image reaches the model
            at one physical scale whatever its pixel size; without, the image is padded to a square.

    Returns:
        uint8 RGB array of shape (input_size, input_size, 3), values 0-255.
    """
    check_rgb(rgb, "cell image")
    if contract.crop_um is not None and um_per_px is not None:
        square = centre_on_square(rgb, max(1, int(round(contract.crop_um / um_per_px))))
    else:
        square = pad_to_square(rgb)
    size = contract.input_size
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    # Area averaging only makes sense for shrinking; enlarging uses linear.
    interp = _INTERPOLATIONS[contract.interpolation]
    if square.shape[0] < size and interp == cv2.INTER_AREA:
        interp = cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


def centre_on_square(rgb: np.ndarray, side: int) -> np.ndarray:
    """The image centred on a black side x side square: padded where smaller, its middle cut where larger."""
    h, w = rgb.shape[:2]
    out = np.zeros((side, side, 3), dtype=np.uint8)
    sy, sx = max(0, (h - side) // 2), max(0, (w - side) // 2)
    part = rgb[sy : sy + min(h, side), sx : sx + min(w, side)]
    oy, ox = (side - part.shape[0]) // 2, (side - part.shape[1]) // 2
    out[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
    return out


def crop_cell(
    field: np.ndarray,
    box: tuple[int, int, int, int],
    mask: np.ndarray | None,
    contract: PreprocessContract,
    um_per_px: float | None = None,
) -> np.ndarray:
    """Cut one white cell out of a field and prepare it like a training image.

    With `contract.crop_um` and a known pixel size the crop is a fixed field of
    view (crop_um micrometres) centred on the cell, so the cell keeps its real
    size relative to the input, as in training. Otherwise (an older bundle, or
    a field whose pixel size is unknown) the cell's box plus `crop_padding` is
    scaled to the input.

    Args:
        field: uint8 RGB field image.
        box: (x0, y0, x1, y1) of the whole cell, x1/y1 exclusive.
        mask: bool array of the box's shape, True on the cell; None means no mask.
        contract: the bundle's preprocessing contract.
        um_per_px: the field's pixel size in micrometres; None = unknown.

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
    if contract.crop_um is not None and um_per_px is not None:
        if not um_per_px > 0:
            raise ValueError(f"um_per_px must be > 0, got {um_per_px}")
        side = max(1, int(round(contract.crop_um / um_per_px)))
    else:
        pad = int(round(max(bw, bh) * contract.crop_padding))
        side = max(bw, bh) + 2 * pad
    if contract.background == "keep":
        # Take the real surroundings where the field has them, black beyond its edge.
        sx0, sy0 = (x0 + x1) // 2 - side // 2, (y0 + y1) // 2 - side // 2
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        fx0, fy0 = max(sx0, 0), max(sy0, 0)
        fx1, fy1 = min(sx0 + side, field.shape[1]), min(sy0 + side, field.shape[0])
        canvas[fy0 - sy0 : fy1 - sy0, fx0 - sx0 : fx1 - sx0] = field[fy0:fy1, fx0:fx1]
    else:
        # The masked cell on black, the same centring as a training image (cut where it is larger).
        canvas = centre_on_square(cell, side)
    return prepare_cell(canvas, contract)
