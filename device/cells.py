"""The white-cell (leukocyte) finder: where the white cells are in a smear field.

This module owns the step between a captured field and the per-cell crops:
it finds the nuclei of white cells in a Wright/Giemsa (Romanowsky) stained
peripheral smear, groups the lobes of one cell, rejects red cells and
platelets, and estimates the whole cell (nucleus + cytoplasm) as a box and a
mask. It also owns "single-cell mode" for inputs that are already one cell
(C-NMC style crops on a black background), and the pixel-size estimate from
red cells.

Method, in short (classical OpenCV, fast enough for a Raspberry Pi):

1. Work on a copy downscaled to a fixed size in microns per pixel (never
   upscaled), so every size below is physical and a 12 MP frame costs about
   as much as a VGA one. The pixel size is configured, or measured from the
   red cells by granulometry, or a default.
2. Convert to optical density against the field's own white point. Nuclei
   (azure B) absorb red and green and pass blue; red cells (eosin) absorb
   mostly green. The red-cell colour is measured on each field and projected
   out, and the rest is read along the nuclear colour: red cells, their
   overlaps and the glass sit near zero, whatever the stain batch or exposure.
3. Hysteresis threshold: seeds from Otsu on the part of the distribution
   above the field's bulk, each grown to its half-maximum edge. Close small
   gaps; fragments separated by less than a gap (lobes of a neutrophil or
   eosinophil) or with centres within about one nucleus radius are one cell.
4. Keep groups whose nucleus size is a white cell's (platelets are 2-3 µm and
   fail the lower limit); the cell is the nucleus' convex hull grown by a
   cytoplasm margin, less the clear glass at its rim.

Image contract: uint8 RGB, shape HxWx3. Anything else raises ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from device.imaging import check_rgb

RED_CELL_INSCRIBED_UM = 6.5
"""The ruler for pixel size: the largest disc that fits inside a normal red cell as the
stain mask sees it. Red cells average 7.5 µm across, but on a smear they are slightly
oval (the inscribed disc follows the short axis) and their thin, pale rim falls partly
below the stain threshold."""


@dataclass(frozen=True)
class FinderOptions:
    """How the white-cell finder runs. Sizes are in microns, so one set fits every camera."""

    um_per_px: float | None = None
    """Pixel size of the input field; None = estimate it from the red cells."""
    default_um_per_px: float = 0.1
    """Pixel size used when um_per_px is None and the red cells cannot tell (100x oil, VGA-ish)."""
    work_um_per_px: float = 0.3
    """Working resolution; the field is downscaled to this (never upscaled) before finding."""
    min_cell_um: float = 4.5
    """Smallest nucleus kept, as an equivalent-circle diameter (platelets are 2-3 µm)."""
    max_cell_um: float = 22.0
    """Largest nucleus kept, as an equivalent-circle diameter (bigger is a clump or a stain blot)."""
    smooth_um: float = 0.4
    """Gaussian sigma applied to the stain image before thresholding (suppresses JPEG and sensor noise)."""
    close_um: float = 1.5
    """Closing diameter that joins the lobes of one nucleus across thin gaps."""
    gap_um: float = 2.5
    """Nucleus pieces closer than this belong to one cell (lobes of a neutrophil or eosinophil)."""
    merge_um: float = 5.0
    """Fragments whose centres are closer than this belong to the same cell (about one nucleus radius)."""
    cytoplasm_um: float = 2.0
    """Margin grown around the nucleus to approximate the whole cell (nucleus + cytoplasm)."""
    nuclear_od: tuple[float, float, float] = (0.5, 0.8, 0.1)
    """Optical-density colour (R, G, B) of Romanowsky-stained nuclei: violet, passes blue."""
    red_cell_od: tuple[float, float, float] = (0.37, 0.73, 0.58)
    """Typical red-cell density colour, used only when a field has too few red cells to measure it."""

    def __post_init__(self) -> None:
        if self.um_per_px is not None and not self.um_per_px > 0:
            raise ValueError(f"FinderOptions.um_per_px must be > 0 or None, got {self.um_per_px}")
        for name in (
            "default_um_per_px",
            "work_um_per_px",
            "min_cell_um",
            "max_cell_um",
            "close_um",
            "gap_um",
            "merge_um",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"FinderOptions.{name} must be > 0, got {getattr(self, name)}")
        if self.max_cell_um <= self.min_cell_um:
            raise ValueError(
                f"FinderOptions.max_cell_um ({self.max_cell_um}) must exceed "
                f"min_cell_um ({self.min_cell_um})"
            )
        if self.smooth_um < 0 or self.cytoplasm_um < 0:
            raise ValueError("FinderOptions.smooth_um and cytoplasm_um must be >= 0")


# eq=False: the mask is an array, and dataclass equality on arrays is ambiguous.
@dataclass(frozen=True, eq=False)
class FoundCell:
    """One white cell found in a field."""

    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 in field pixels (x1, y1 exclusive), the whole cell, clipped to the image."""
    mask: np.ndarray
    """bool, shape (y1 - y0, x1 - x0): True on the cell (nucleus + cytoplasm estimate)."""
    nucleus_area_um2: float
    """Area of the stained nucleus in square microns."""
    score: float
    """0..1, how far the nuclear stain stands above the threshold; for ranking, not a probability."""
    touches_border: bool
    """The cell (nucleus grown by the cytoplasm margin) is cut by the image edge."""


# ----------------------------------------------------------------------------- helpers


def _disc(diameter_px: float) -> np.ndarray:
    d = max(1, int(round(diameter_px)))
    if d % 2 == 0:
        d += 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _white_point(rgb: np.ndarray) -> np.ndarray:
    """Per-channel brightness of the empty glass: the mean of the brightest 10% of pixels.

    Measured on each field so exposure and lamp colour drop out of the densities.
    """
    lum = rgb.sum(axis=2)
    bright = rgb[lum >= np.percentile(lum, 90)]
    return np.maximum(bright.mean(axis=0), 1.0)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """float32 HxWx3 optical density (>= 0) of a float RGB image against its own white point."""
    white = _white_point(rgb)
    od = -np.log((rgb + 1.0) / (white + 1.0))
    return np.maximum(od, 0.0).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D float sample (computed on a 256-bin histogram)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return hi
    q = np.round((values - lo) / (hi - lo) * 255).astype(np.uint8)
    t, _ = cv2.threshold(q.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return lo + (t + 0.5) / 255 * (hi - lo)


def _stained_mask(od: np.ndarray) -> np.ndarray:
    """Everything that is not empty glass (red cells, white cells, platelets): Otsu on total density."""
    total = od.sum(axis=2)
    return total > _otsu(total.ravel())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes (e.g. the central pallor of red cells, gaps between lobes)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return mask | (flood[1:-1, 1:-1] == 0)


def _downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """float32 RGB copy shrunk by `factor` (<= 1) with area averaging."""
    if factor >= 1.0:
        return rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32)


# ----------------------------------------------------------------------------- pixel size


def _median_inscribed_diameter(stained: np.ndarray) -> float | None:
    """Granulometry: the disc diameter whose opening removes half of the stained area.

    Opening by a disc of radius r keeps exactly the pixels that lie in some
    disc of radius r inside the mask, so the area left falls steeply at the
    typical object's inscribed radius. Unlike blob counting, this works on
    clumps and chains of overlapping red cells. Both the erosion and the
    dilation come from distance transforms, so each radius costs two O(N) passes.
    """
    mask = stained.astype(np.uint8)
    total = int(mask.sum())
    if total == 0:
        return None
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    r_prev, kept_prev = 0.0, 1.0
    r = 1.5
    while r < min(mask.shape) / 4:
        core = (dist > r).astype(np.uint8)
        kept = 0.0
        if core.any():
            opened = cv2.distanceTransform(1 - core, cv2.DIST_L2, 5) <= r
            kept = float((opened & stained).sum()) / total
        if kept < 0.5:
            # Interpolate the half-area crossing between the last two radii.
            r_half = r_prev + (r - r_prev) * (kept_prev - 0.5) / max(kept_prev - kept, 1e-6)
            return 2 * r_half
        r_prev, kept_prev = r, kept
        r *= 1.08
    return None


def estimate_um_per_px(rgb: np.ndarray) -> float | None:
    """Estimate the pixel size from the red cells.

    Args:
        rgb: uint8 RGB field, HxWx3.

    Returns:
        Microns per pixel, or None when the red cells cannot tell (an almost
        empty field, a packed area with no glass between cells, a single-cell
        crop, or cells too small to measure).
    """
    check_rgb(rgb, "estimate_um_per_px")
    h, w = rgb.shape[:2]
    long_side = 640
    for _ in range(3):
        factor = min(1.0, long_side / max(h, w))
        stained = _fill_holes(_stained_mask(_optical_density(_downscale(rgb, factor))))
        fraction = float(stained.mean())
        # Without glass between them (or without cells) there is no cell size to read.
        if not 0.05 <= fraction <= 0.85:
            return None
        diameter = _median_inscribed_diameter(stained)
        if diameter is None:
            return None
        # Below ~16 px the measurement is too coarse: look again at higher resolution.
        if diameter >= 16 or factor >= 1.0:
            break
        long_side = int(long_side * 24 / diameter)
    if diameter < 6:
        return None
    return RED_CELL_INSCRIBED_UM / (diameter / factor)


# ----------------------------------------------------------------------------- finder


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _nuclear_stain(
    od: np.ndarray, stained: np.ndarray, nuclear_od: np.ndarray, red_cell_od: np.ndarray
) -> np.ndarray:
    """Nuclear-stain density: optical density along the nuclear colour, with the red-cell colour removed.

    Red cells (eosin) absorb mostly green with some blue; nuclei (azure B)
    absorb red and green and pass blue. Stain batches and cameras shift both
    colours, so the red-cell direction is measured on each field (the median
    density of the stained pixels, which are mostly red cells) and projected
    out; what is left is read along the part of the nuclear colour that
    differs from it. Red cells, their overlaps and the glass then sit near
    zero, whatever their thickness, and only violet material stays high.
    """
    sel = od[stained]
    measured = _unit(np.median(sel, axis=0)) if sel.shape[0] > 100 else red_cell_od
    nuc = _unit(nuclear_od)
    # A field with hardly any red cells (or one filled by a white cell) measures the
    # nucleus itself; fall back to the typical red-cell colour rather than cancel it.
    e = measured if float(measured @ nuc) < 0.9 else _unit(red_cell_od)
    u = _unit(nuc - (nuc @ e) * e)
    return od @ u.astype(np.float32)


def _segment_nuclei(
    stain: np.ndarray, min_seed_px: int, max_reach_px: int
) -> tuple[np.ndarray, float]:
    """Nucleus pixels of one field, by hysteresis: find strong seeds, then grow to half maximum.

    Nuclei are a few percent of the pixels, so Otsu on the whole field would
    split glass from red cells instead. The bulk of the field (glass, red
    cells) sets a robust level and spread; Otsu on the pixels clearly above
    that bulk gives seeds, the cores of anything strongly stained. Each seed
    then grows to where its stain falls to half way between the bulk level
    and its own peak: the half-maximum edge of a blurred object, which keeps
    a weakly stained nucleus as whole as a strong one. Platelets and specks
    also seed, and are dropped later by size.

    Returns:
        (bool mask of nucleus pixels, the seed threshold)
    """
    values = stain.ravel()
    level = float(np.median(values))
    spread = max(1.4826 * float(np.median(np.abs(values - level))), 1e-3)
    low = level + 3 * spread
    tail = values[values > low]
    seed_t = max(_otsu(tail), low) if tail.size >= 20 else low
    seeds = (stain > seed_t).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(seeds, connectivity=8)
    h, w = stain.shape
    out = np.zeros(stain.shape, bool)
    for i in np.argsort(-stats[:, cv2.CC_STAT_AREA]):
        if i == 0 or stats[i, cv2.CC_STAT_AREA] < min_seed_px:
            continue
        # Grow inside a window around the seed: a nucleus reaches at most
        # max_reach_px beyond its core, and a window keeps many seeds cheap.
        x, y, bw, bh = stats[i, :4]
        x0, y0 = max(0, x - max_reach_px), max(0, y - max_reach_px)
        x1, y1 = min(w, x + bw + max_reach_px), min(h, y + bh + max_reach_px)
        seed = labels[y0:y1, x0:x1] == i
        if out[y0:y1, x0:x1][seed].any():
            continue  # already inside a region grown from a bigger seed
        local = stain[y0:y1, x0:x1]
        peak = float(local[seed].max())
        edge = max(level + 0.5 * (peak - level), low)
        _, grown = cv2.connectedComponents((local > edge).astype(np.uint8), connectivity=8)
        ids = np.unique(grown[seed])
        out[y0:y1, x0:x1] |= np.isin(grown, ids[ids > 0])
    return out, seed_t


def _groups(nucleus: np.ndarray, gap_px: float, merge_px: float) -> list[np.ndarray]:
    """Split the nucleus mask into one group per cell.

    Fragments join when less than gap_px of glass or cytoplasm separates them
    (the lobes of a neutrophil or eosinophil), or when their centres are
    closer than merge_px (pieces of one nucleus that a weak chromatin patch
    cut apart).
    """
    bridged = cv2.dilate(nucleus.astype(np.uint8), _disc(gap_px))
    n, labels, _, _ = cv2.connectedComponentsWithStats(bridged, connectivity=8)
    labels = np.where(nucleus, labels, 0)
    centroids = np.zeros((n, 2))
    for i in range(1, n):
        ys, xs = np.nonzero(labels == i)
        if xs.size:
            centroids[i] = xs.mean(), ys.mean()
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(1, n):
        for j in range(i + 1, n):
            if np.hypot(*(centroids[i] - centroids[j])) < merge_px:
                parent[find(i)] = find(j)
    roots: dict[int, list[int]] = {}
    for i in range(1, n):
        roots.setdefault(find(i), []).append(i)
    lut = np.zeros(n, np.int32)
    for k, members in enumerate(roots.values(), start=1):
        lut[members] = k
    grouped = lut[labels]
    return [g for k in range(1, len(roots) + 1) if (g := grouped == k).any()]


def find_white_cells(rgb: np.ndarray, options: FinderOptions = FinderOptions()) -> list[FoundCell]:
    """Find the white cells in a stained smear field.

    Args:
        rgb: uint8 RGB field, HxWx3 (any size, from VGA to 12 MP).
        options: FinderOptions; sizes are in microns.

    Returns:
        FoundCells in field pixels, strongest stain first.

    Raises:
        ValueError: rgb is not a uint8 HxWx3 array.
    """
    check_rgb(rgb, "find_white_cells")
    H, W = rgb.shape[:2]
    um_per_px = options.um_per_px or estimate_um_per_px(rgb) or options.default_um_per_px
    factor = min(1.0, um_per_px / options.work_um_per_px)
    small = _downscale(rgb, factor)
    h, w = small.shape[:2]
    sx, sy = W / w, H / h
    work_um = um_per_px * (sx + sy) / 2  # microns per working pixel

    od = _optical_density(small)
    stained = _stained_mask(od)
    # Pale cytoplasm (neutrophils, monocytes) is lighter than a red cell but
    # darker than glass: for the cell mask, only clearly empty glass is excluded.
    total_od = od.sum(axis=2)
    glass = total_od < 0.5 * _otsu(total_od.ravel())
    stain = _nuclear_stain(
        od,
        stained,
        np.asarray(options.nuclear_od, np.float64),
        np.asarray(options.red_cell_od, np.float64),
    )
    if options.smooth_um > 0:
        stain = cv2.GaussianBlur(stain, (0, 0), options.smooth_um / work_um)
    min_area = math.pi / 4 * (options.min_cell_um / work_um) ** 2
    max_area = math.pi / 4 * (options.max_cell_um / work_um) ** 2
    nucleus, t = _segment_nuclei(
        stain, max(2, int(min_area / 20)), int(math.ceil(options.max_cell_um / work_um))
    )
    nucleus = nucleus.astype(np.uint8)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_CLOSE, _disc(options.close_um / work_um))
    # A small opening drops specks (platelet fragments, dust) before grouping.
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disc(1.0 / work_um)).astype(bool)

    grow = _disc(2 * options.cytoplasm_um / work_um)
    margin = options.cytoplasm_um / work_um
    cells: list[tuple[float, FoundCell]] = []
    for group in _groups(nucleus, options.gap_um / work_um, options.merge_um / work_um):
        area = int(group.sum())
        if not min_area <= area <= max_area:
            continue
        ys, xs = np.nonzero(group)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        touches = bool(x0 - margin < 0 or y0 - margin < 0 or x1 + margin > w or y1 + margin > h)
        # The cell is the nucleus' convex hull grown by the cytoplasm margin,
        # less the clearly empty glass at its rim.
        hull = cv2.convexHull(np.column_stack([xs, ys]).astype(np.int32))
        body = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(body, hull, 1)
        body = cv2.dilate(body, grow).astype(bool)
        cell = _fill_holes(body & ~glass) & body
        cys, cxs = np.nonzero(body)
        bx0, by0, bx1, by1 = cxs.min(), cys.min(), cxs.max() + 1, cys.max() + 1
        box = (
            max(0, int(math.floor(bx0 * sx))),
            max(0, int(math.floor(by0 * sy))),
            min(W, int(math.ceil(bx1 * sx))),
            min(H, int(math.ceil(by1 * sy))),
        )
        mask = _upsample_mask(cell, box, sx, sy)
        mean_stain = float(stain[group].mean())
        score = float(np.clip(1.0 - t / mean_stain, 0.0, 1.0)) if mean_stain > 0 else 0.0
        found = FoundCell(
            box=box,
            mask=mask,
            nucleus_area_um2=float(area * work_um**2),
            score=score,
            touches_border=touches,
        )
        cells.append((score, found))
    cells.sort(key=lambda c: -c[0])
    return [c for _, c in cells]


def _upsample_mask(
    mask: np.ndarray, box: tuple[int, int, int, int], sx: float, sy: float
) -> np.ndarray:
    """Map a working-resolution mask onto the field-pixel box with smooth edges."""
    x0, y0, x1, y1 = box
    # Sample the working mask at the centre of every field pixel in the box.
    map_x = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / sx - 0.5)[None, :]
    map_y = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / sy - 0.5)[:, None]
    map_x = np.broadcast_to(map_x, (y1 - y0, x1 - x0)).astype(np.float32)
    map_y = np.broadcast_to(map_y, (y1 - y0, x1 - x0)).astype(np.float32)
    up = cv2.remap(
        mask.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return up > 0.5


# ----------------------------------------------------------------------------- single-cell mode


def single_cell(rgb: np.ndarray, um_per_px: float | None = None) -> FoundCell:
    """Treat the whole input as one cell (C-NMC style crop, possibly on a black background).

    Args:
        rgb: uint8 RGB crop, HxWx3.
        um_per_px: pixel size, for nucleus_area_um2; None = FinderOptions().default_um_per_px.

    Returns:
        A FoundCell whose box is the whole image. Its mask is the non-background
        pixels when the crop sits on black (near-black pixels connected to the
        image edge), and all True when there is no black background.
    """
    check_rgb(rgb, "single_cell")
    h, w = rgb.shape[:2]
    scale = um_per_px or FinderOptions().default_um_per_px
    # Near-black, not exactly zero: JPEG and resizing smear the pure-black surround.
    dark = (rgb.max(axis=2) <= 16).astype(np.uint8)
    n, labels = cv2.connectedComponents(dark, connectivity=8)
    edge_labels = set(
        np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist()
    ) - {0}
    background = np.isin(labels, list(edge_labels)) if edge_labels else np.zeros((h, w), bool)
    mask = ~background
    if not mask.any():
        mask = np.ones((h, w), bool)  # an all-black crop: nothing to mask, keep the contract
    # Nucleus: the darker-in-red part of the cell (nuclear stain absorbs red light).
    red = rgb[..., 0][mask]
    t = _otsu(red.astype(np.float32)) if red.size else 0.0
    nucleus_px = int((red <= t).sum()) if red.size else 0
    return FoundCell(
        box=(0, 0, w, h),
        mask=mask,
        nucleus_area_um2=float(nucleus_px * scale**2),
        score=1.0,
        touches_border=False,
    )
