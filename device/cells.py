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
from typing import NamedTuple

import cv2
import numpy as np

from device import stain as stain_model
from device.imaging import check_rgb

MAX_STAIN_OD = 3.0
"""Total optical density (R+G+B) above which a pixel is black (ink, dirt), not stain."""
CHECK_RBC_PX = 12
"""Red-cell size (inscribed diameter, px) at which the per-capture scale check looks: coarse and cheap,
enough to catch another objective (a factor of 1.5 or more), not to calibrate."""
NECK_RATIO = 0.55
"""Two nucleus cores joined by a neck thinner than this fraction of the smaller core are two cells."""
MIN_FIELD_PX = 16
"""Smaller images cannot hold a white cell at any supported resolution (0.5 µm/px: 8 µm)."""

RED_CELL_INSCRIBED_UM = 6.5
"""The ruler for pixel size: the largest disc that fits inside a normal red cell as the
stain mask sees it. Red cells average 7.5 µm across, but on a smear they are slightly
oval (the inscribed disc follows the short axis) and their thin, pale rim falls partly
below the stain threshold."""


@dataclass(frozen=True)
class FinderParams:
    """The finder algorithm's parameters (sizes in microns, so one set fits every camera).

    Not to be confused with `device.config.FinderConfig`, the operator's [finder] section of
    leukocam.toml (calibrated pixel size, cell limit, scale check), from which the pipeline
    takes the pixel size it passes here.
    """

    um_per_px: float | None = None
    """Pixel size of the input field; None = estimate it from the red cells."""
    default_um_per_px: float = 0.1
    """Pixel size used when um_per_px is None and the red cells cannot tell (100x oil, VGA-ish)."""
    work_um_per_px: float = 0.4
    """Scale of the working copy (`working_copy`) that quality control, the scale check and the finder share;
    the field is downscaled to this, never upscaled."""
    find_um_per_px: float = 0.8
    """The finder's own scale: the working copy is halved once more and the nuclei are found there (a 4.5 µm
    nucleus is still 5.6 px across); each cell's outline is cut back on the working copy. Measured on the stress
    corpus: 0.8 meets the target in every condition, as 0.4 does, with the same masks and field-path parity,
    in half the time (docs/finder.md)."""
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
    cytoplasm_um: float = 3.5
    """Widest cytoplasm searched for around a nucleus (the whole cell is cut tightly inside it)."""
    nucleus_core_um: float = 6.0
    """Width from which a piece of nucleus counts as a whole nucleus (a lobe is thinner): two such
    pieces are never merged into one cell, and touching ones are cut apart at their neck."""
    min_thickness_um: float = 2.5
    """A nucleus is at least this thick somewhere (text strokes, scale bars and fibres are thinner)."""
    min_nuclear_od: float = 0.15
    """Least nuclear-stain optical density, above the field's background, of anything called a nucleus."""

    def __post_init__(self) -> None:
        if self.um_per_px is not None and not self.um_per_px > 0:
            raise ValueError(f"FinderParams.um_per_px must be > 0 or None, got {self.um_per_px}")
        for name in (
            "default_um_per_px",
            "work_um_per_px",
            "find_um_per_px",
            "min_cell_um",
            "max_cell_um",
            "close_um",
            "gap_um",
            "merge_um",
            "nucleus_core_um",
            "min_thickness_um",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"FinderParams.{name} must be > 0, got {getattr(self, name)}")
        if self.max_cell_um <= self.min_cell_um:
            raise ValueError(
                f"FinderParams.max_cell_um ({self.max_cell_um}) must exceed min_cell_um ({self.min_cell_um})"
            )
        if self.smooth_um < 0 or self.cytoplasm_um < 0 or self.min_nuclear_od < 0:
            raise ValueError("FinderParams.smooth_um, cytoplasm_um and min_nuclear_od must be >= 0")


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


def field_problem(rgb: np.ndarray, on_black: bool = False) -> str | None:
    """Why a uint8 RGB image cannot be a smear field (or a cell), or None when it can be searched.

    A blank, black, saturated or one-colour image, or one too small to hold a
    white cell, gets a verdict a person can act on instead of junk cells.

    Args:
        rgb: uint8 RGB image.
        on_black: the image is one cell on a black background (an upload in single-cell mode):
            only its non-black pixels are judged.
    """
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_FIELD_PX:
        return f"the image is only {w}x{h} px: too small to hold a white cell (at least {MIN_FIELD_PX} px a side)"
    step = max(1, int(math.sqrt(h * w / 20_000)))
    sample = rgb[::step, ::step].reshape(-1, 3).astype(np.int16)
    if on_black:
        lit = sample[sample.max(axis=1) > 16]
        if lit.shape[0] < 0.01 * sample.shape[0]:
            return "the image is black: no cell in it"
        sample = lit
    lum = (sample @ np.ones(3)) / 3  # integer sums: exact in float64, as sum(axis=1) / 3 was
    if float(np.mean(lum)) < 20:
        return "the image is almost black: check the lamp, the shutter and the exposure"
    if float(np.mean(np.minimum(np.minimum(sample[:, 0], sample[:, 1]), sample[:, 2]) >= 250)) > 0.9:
        return "the image is saturated white: lower the exposure or the lamp"
    low, high = np.percentile(sample, [0.5, 99.5], axis=0)
    spread = high - low
    if float(spread.max()) < 12:
        return "the image is one flat colour with no detail: no smear in view, or the camera is covered"
    if roughness(rgb) > MAX_ROUGHNESS:
        return (
            "the image is noise, not a photo of cells (neighbouring pixels are as different as any two): "
            "check the lamp and the exposure, or upload a photo of a stained smear"
        )
    return None


def copy_problem(rgb: np.ndarray, small: np.ndarray, on_black: bool = False) -> str | None:
    """`field_problem` judged on a shrunk copy of the field (a blank, saturated or noise frame is told as well
    there, at a fraction of the cost on 12 MP), or on the field itself when the copy is too small to judge."""
    return field_problem(small if min(small.shape[:2]) >= MIN_FIELD_PX else rgb, on_black)


MAX_ROUGHNESS = 0.7
"""Above this `roughness` an image is noise. Measured: real C-NMC cells 0.20-0.29, BCCD fields in every stress
condition 0.09-0.32 (0.5 um/px is the roughest), SYNTHETIC cells 0.12-0.37; uniform or Gaussian noise 1.0-1.15."""


def roughness(rgb: np.ndarray, side: int = 256) -> float:
    """How unlike a photo an image is: mean difference of neighbouring grey pixels over the grey spread.

    Measured on a copy of at most `side` px (area-averaged), over the non-black pixels only (a cell on
    black). Any photo of an object is smooth at the pixel scale (about 0.1-0.4); independent noise is
    not (about 1.0-1.15, whatever its amplitude or size, since both terms scale alike).
    """
    h, w = rgb.shape[:2]
    if max(h, w) > 2 * side:  # nearest-neighbour to 2x first: area-averaging all of 12 MP costs 60 ms
        k = 2 * side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_NEAREST)
        h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    grey = rgb.astype(np.float32) @ np.full(3, 1 / 3, np.float32)  # the channel mean, as a matrix product
    lit = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > 16
    dx = np.abs(np.diff(grey, axis=1))[lit[:, 1:] & lit[:, :-1]]
    dy = np.abs(np.diff(grey, axis=0))[lit[1:] & lit[:-1]]
    spread = float(grey[lit].std()) if lit.any() else 0.0
    if spread < 1e-6 or dx.size + dy.size == 0:
        return 0.0
    return float((dx.sum() + dy.sum()) / (dx.size + dy.size) / spread)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D float sample (computed on a 256-bin histogram)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return hi
    q = np.round((values - lo) / (hi - lo) * 255).astype(np.uint8)
    t, _ = cv2.threshold(q.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return lo + (t + 0.5) / 255 * (hi - lo)


def _glass_level(total: np.ndarray) -> float:
    """Otsu split of total optical density between empty glass and stained material.

    Densities are capped at MAX_STAIN_OD first: black text, a scale bar or a
    dust speck would otherwise pull the split up between "stained" and "black".
    """
    return _otsu(np.minimum(total.ravel(), MAX_STAIN_OD))


def _total_od(od: np.ndarray) -> np.ndarray:
    """Summed optical density of the three channels (a matrix product: far faster than sum(axis=2))."""
    return od @ np.ones(3, od.dtype)


def _stained_mask(od: np.ndarray) -> np.ndarray:
    """Everything that is not empty glass (red cells, white cells, platelets)."""
    total = _total_od(od)
    return total > _glass_level(total)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes (e.g. the central pallor of red cells, gaps between lobes)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return mask | (flood[1:-1, 1:-1] == 0)


def _downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The RGB image shrunk by `factor` (<= 1) with area averaging, in its own dtype (itself when factor >= 1)."""
    if factor >= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    # Halve while the target is at most half as big: a bilinear halving samples exactly between four
    # pixels, so it is their mean, the same 2x2 box average INTER_AREA takes, at a quarter of its cost on
    # 12 MP (area-averaging all of a 12 MP frame by 4 costs about as much as the rest of the finder).
    while rgb.shape[1] >= 2 * size[0] and rgb.shape[0] >= 2 * size[1]:
        rgb = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_LINEAR)
    if rgb.shape[:2] == (size[1], size[0]):
        return rgb
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- pixel size


def _median_inscribed_diameter(stained: np.ndarray, r_start: float = 1.5) -> float | None:
    """Granulometry: the disc diameter whose opening removes half of the stained area.

    Opening by a disc of radius r keeps exactly the pixels that lie in some
    disc of radius r inside the mask, so the area left falls steeply at the
    typical object's inscribed radius. Unlike blob counting, this works on
    clumps and chains of overlapping red cells. Both the erosion and the
    dilation come from distance transforms, so each radius costs two O(N) passes.
    `r_start` skips the radii far below an expected size (the cheap check).
    """
    mask = stained.astype(np.uint8)
    total = int(mask.sum())
    if total == 0:
        return None
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    r_prev, kept_prev = 0.0, 1.0
    r = r_start
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


def estimate_um_per_px(rgb: np.ndarray, expected: float | None = None) -> float | None:
    """Estimate the pixel size from the red cells.

    Pixel size belongs to the optics: calibrate it once (`leukocam calibrate`)
    and pass it to the finder. With `expected` (the calibrated value) this is
    a cheap check: the field is shrunk once so an expected red cell spans
    CHECK_RBC_PX pixels, and radii from half of that are tried.

    Args:
        rgb: uint8 RGB field, HxWx3.
        expected: the calibrated pixel size, for a single cheap look; None searches.

    Returns:
        Microns per pixel, or None when the red cells cannot tell (an almost
        empty field, a packed area with no glass between cells, a single-cell
        crop, or cells too small to measure).
    """
    check_rgb(rgb, "estimate_um_per_px")
    h, w = rgb.shape[:2]
    r_start = 1.5
    if expected is not None:
        # One look at the scale where the expected red cell is CHECK_RBC_PX across; radii from half of it.
        long_side = int(max(h, w) * min(1.0, CHECK_RBC_PX * expected / RED_CELL_INSCRIBED_UM))
        tries = 1
        r_start = max(1.5, CHECK_RBC_PX / 4)
    else:
        long_side, tries = 640, 3
    for _ in range(tries):
        factor = min(1.0, long_side / max(h, w))
        stained = _fill_holes(_stained_mask(stain_model.optical_density(_downscale(rgb, factor))))
        fraction = float(stained.mean())
        # Without glass between them (or without cells) there is no cell size to read.
        if not 0.05 <= fraction <= 0.85:
            return None
        diameter = _median_inscribed_diameter(stained, r_start)
        if diameter is None:
            return None
        # Below ~16 px the measurement is too coarse: look again at higher resolution.
        if diameter >= 16 or factor >= 1.0:
            break
        long_side = int(long_side * 24 / diameter)
    if expected is None and diameter < 6:
        return None  # too small to measure
    # With an expected size, a red cell far smaller than expected still gives a (rough) value: enough to warn.
    return RED_CELL_INSCRIBED_UM / (max(diameter, 1.0) / factor)


def check_scale(rgb: np.ndarray, calibrated: float, tolerance: float = 0.25, factor: float = 1.0) -> str | None:
    """A warning when the red cells say the pixel size differs from the calibration, else None.

    Cheap (one measurement on a shrunk copy); a field whose red cells cannot
    tell (blast-dense, packed, empty) passes silently.

    Args:
        rgb: the field, or a copy of it scaled by `factor` (<= 1; `working_copy`, which the
            pipeline already has: the check then costs no shrink of the full frame).
        calibrated: the calibrated pixel size of the field, µm/px.
    """
    estimate = estimate_um_per_px(rgb, expected=calibrated / factor)
    if estimate is not None:
        estimate *= factor
    if estimate is None or abs(estimate / calibrated - 1) <= tolerance:
        return None
    return (
        f"the red cells suggest {estimate:.3f} µm/px but the calibration says {calibrated:.3f}: "
        "was the objective or camera changed? Re-run `leukocam calibrate` on a few fields"
    )


# ----------------------------------------------------------------------------- finder


def _nuclear_map(small: np.ndarray, work_um: float, options: FinderParams):
    """Optical density, nuclear-stain and red-cell-stain amounts of a working-resolution field, its stains,
    and the light behind it (the thumbnail-sized surface `stain.optical_density` stretches)."""
    light = stain_model.illumination(small, full_size=False)
    od = stain_model.optical_density(small, light)
    vectors = stain_model.estimate_stains(od)
    nuc, red = _stain_amounts(od, vectors, options.smooth_um / work_um)
    return od, nuc, red, vectors, light


def _stain_amounts(od: np.ndarray, vectors, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear and red-cell stain amounts of an OD image, smoothed with a Gaussian of `sigma` px."""
    conc = stain_model.concentrations(od, vectors)
    nuc = np.ascontiguousarray(conc[..., 0])
    red = np.ascontiguousarray(conc[..., 1])
    if sigma > 0:
        nuc = cv2.GaussianBlur(nuc, (0, 0), sigma)
        red = cv2.GaussianBlur(red, (0, 0), sigma)
    return nuc, red


def _levels(nuc: np.ndarray, floor: float) -> tuple[float, float, float]:
    """(background level, low edge, seed threshold) of the nuclear-stain map.

    Otsu splits nuclear from everything else on the deconvolved map, where
    glass and red cells sit near zero whatever their share of the field; the
    background's own median and spread come from the pixels below that split,
    so a field that is mostly blasts sets its levels as well as a sparse one.
    `floor` is the least nuclear density anything called a nucleus must have.
    """
    values = nuc.ravel()
    if values.size > 60_000:  # a regular subsample: the levels of 60,000 pixels are those of all of them
        values = values[:: values.size // 60_000 + 1]
    split = _otsu(values)
    below = values[values < split]
    if below.size < 0.02 * values.size:
        below = values[values <= np.percentile(values, 20)]
    level = float(np.median(below))
    spread = max(1.4826 * float(np.median(np.abs(below - level))), 1e-3)
    low = max(level + 4 * spread, level + 0.5 * floor)
    seed_t = max(split, low, level + floor)
    return level, low, seed_t


def _segment_nuclei(
    stain: np.ndarray, level: float, low: float, seed_t: float, min_seed_px: int, max_reach_px: int
) -> np.ndarray:
    """Nucleus pixels, by hysteresis: strong seeds, each grown to its half-maximum edge.

    Each seed grows to where its stain falls half way between the background
    level and its own peak: the half-maximum edge of a blurred object, which
    keeps a pale nucleus as whole as a dark one. Platelets and specks also
    seed, and are dropped later by size.
    """
    seeds = (stain > seed_t).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(seeds, connectivity=8)
    h, w = stain.shape
    out = np.zeros(stain.shape, bool)
    for i in np.argsort(-stats[:, cv2.CC_STAT_AREA]):
        if i == 0 or stats[i, cv2.CC_STAT_AREA] < min_seed_px:
            continue
        # Grow inside a window around the seed: a nucleus reaches at most max_reach_px beyond
        # its core. Most seeds (platelets, small nuclei) stop far sooner, so a tight window is
        # tried first and widened only when the region reaches its inner edge: the same region
        # either way, at a fraction of the cost on a field with hundreds of seeds.
        x, y, bw, bh = stats[i, :4]
        reach = min(max_reach_px, max(4, int(max(bw, bh))))
        peak = None
        while True:
            x0, y0 = max(0, x - reach), max(0, y - reach)
            x1, y1 = min(w, x + bw + reach), min(h, y + bh + reach)
            seed = labels[y0:y1, x0:x1] == i
            if peak is None:
                if out[y0:y1, x0:x1][seed].any():
                    break  # already inside a region grown from a bigger seed
                peak = float(stain[y0:y1, x0:x1][seed].max())
                edge = max(level + 0.5 * (peak - level), low)
            n_grown, grown = cv2.connectedComponents((stain[y0:y1, x0:x1] > edge).astype(np.uint8), connectivity=8)
            keep = np.zeros(n_grown, bool)
            keep[grown[seed]] = True
            keep[0] = False
            region = keep[grown]
            inner_edge = (
                (y0 > 0 and region[0].any())
                or (y1 < h and region[-1].any())
                or (x0 > 0 and region[:, 0].any())
                or (x1 < w and region[:, -1].any())
            )
            if not inner_edge or reach >= max_reach_px:
                out[y0:y1, x0:x1] |= region
                break
            reach = max_reach_px
    return out


class _DisjointSets:
    """Union-find over 0..n-1 (path halving): which pieces belong to one cell."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _split_touching(nucleus: np.ndarray, full_radius_px: float) -> np.ndarray:
    """Label image of nuclei, with touching nuclei cut apart along their neck.

    Every local maximum of the distance transform at least `full_radius_px`
    deep is the core of a nucleus-sized blob. Two cores belong to one nucleus
    when the straight path between them never narrows below NECK_RATIO of the
    shallower core (a single oval or indented nucleus); otherwise there is a
    neck between two cells, and a watershed on the distance map cuts it.
    Lobes of a neutrophil are thinner than `full_radius_px` and never become
    cores, so they are not cut here (they are grouped later).
    """
    mask = nucleus.astype(np.uint8)
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    if n <= 1:
        return labels
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    size = max(3, int(full_radius_px) | 1)
    peaks = (dist >= full_radius_px) & (dist >= cv2.dilate(dist, np.ones((size, size), np.uint8)) - 1e-3)
    pn, plabels, pstats, pcent = cv2.connectedComponentsWithStats(peaks.astype(np.uint8), connectivity=8)
    if pn <= 2:
        return labels
    # Group the peak plateaus of each component that are not separated by a neck.
    sets = _DisjointSets(pn)
    depth = np.zeros(pn)
    comp = np.zeros(pn, np.int32)
    for k in range(1, pn):
        cx, cy = int(round(pcent[k][0])), int(round(pcent[k][1]))
        bx, by, bw, bh = pstats[k, :4]
        ys, xs = np.nonzero(plabels[by : by + bh, bx : bx + bw] == k)
        ys, xs = ys + by, xs + bx
        j = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        pcent[k] = (xs[j], ys[j])
        depth[k] = dist[ys[j], xs[j]]
        comp[k] = labels[ys[j], xs[j]]
    for a in range(1, pn):
        for b in range(a + 1, pn):
            if comp[a] != comp[b]:
                continue
            steps = int(np.hypot(*(pcent[a] - pcent[b]))) + 2
            xs = np.linspace(pcent[a][0], pcent[b][0], steps).round().astype(int)
            ys = np.linspace(pcent[a][1], pcent[b][1], steps).round().astype(int)
            if dist[ys, xs].min() >= NECK_RATIO * min(depth[a], depth[b]):
                sets.join(a, b)
    cores: dict[int, list[int]] = {}
    for k in range(1, pn):
        cores.setdefault(comp[k], []).append(sets.find(k))
    split_comps = {c for c, roots in cores.items() if len(set(roots)) > 1}
    if not split_comps:
        return labels
    # Markers: every unsplit component whole, and the merged cores of each split one.
    whole = np.zeros(n, np.int32)
    next_id = 1
    for c in range(1, n):
        if c not in split_comps:
            whole[c] = next_id
            next_id += 1
    markers = whole[labels]
    core_ids = np.zeros(pn, np.int32)
    root_ids: dict[int, int] = {}
    for k in range(1, pn):
        if comp[k] in split_comps:
            core_ids[k] = root_ids.setdefault(sets.find(k), next_id + len(root_ids))
    next_id += len(root_ids)
    cores_px = core_ids[plabels]
    markers[cores_px > 0] = cores_px[cores_px > 0]
    # Watershed on the inverted distance map, inside the nucleus mask only.
    relief = cv2.normalize(-dist, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    markers[mask == 0] = next_id  # the outside is one more basin
    cv2.watershed(cv2.cvtColor(relief, cv2.COLOR_GRAY2BGR), markers)
    markers[(markers == next_id) | (markers < 0) | (mask == 0)] = 0
    return markers


def _inscribed_radius(mask: np.ndarray) -> float:
    """Radius in pixels of the largest disc inside a bool mask."""
    ys, xs = np.nonzero(mask)
    crop = np.pad(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], 1).astype(np.uint8)
    return float(cv2.distanceTransform(crop, cv2.DIST_L2, 5).max())


@dataclass(frozen=True)
class _Region:
    """One labelled region of a label image, with its bounding window."""

    label: int
    y0: int
    y1: int
    x0: int
    x1: int

    def mask(self, labels: np.ndarray, pad: int = 0) -> tuple[np.ndarray, int, int]:
        """(bool mask of the region in its window grown by pad, window top, window left)."""
        h, w = labels.shape
        y0, x0 = max(0, self.y0 - pad), max(0, self.x0 - pad)
        return labels[y0 : min(h, self.y1 + pad), x0 : min(w, self.x1 + pad)] == self.label, y0, x0


def _regions(labels: np.ndarray) -> tuple[list[_Region], np.ndarray]:
    """The regions of a label image (0 = background) and the pixel count of every label, in one pass."""
    n = int(labels.max()) + 1
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n)
    big = np.iinfo(np.int64).max
    y0, x0 = np.full(n, big), np.full(n, big)
    y1, x1 = np.full(n, -1), np.full(n, -1)
    np.minimum.at(y0, lab, ys)
    np.minimum.at(x0, lab, xs)
    np.maximum.at(y1, lab, ys)
    np.maximum.at(x1, lab, xs)
    regions = [_Region(k, int(y0[k]), int(y1[k]) + 1, int(x0[k]), int(x1[k]) + 1) for k in range(1, n) if area[k]]
    return regions, area


def _group(pieces: np.ndarray, gap_px: float, full_radius_px: float, merge_px: float) -> np.ndarray:
    """Label image with one label per cell: join the lobes of one nucleus, keep whole nuclei apart.

    Pieces closer than gap_px (or whose centres are within merge_px) join when
    at least one of them is lobe-sized (thinner than a whole nucleus): the
    lobes of a neutrophil or eosinophil, or a nucleus cut by a pale chromatin
    patch. Two nucleus-sized pieces never join, so touching blasts stay apart.
    """
    n = int(pieces.max()) + 1
    if n <= 1:
        return pieces
    dist = cv2.distanceTransform((pieces > 0).astype(np.uint8), cv2.DIST_L2, 3)
    ys, xs = np.nonzero(pieces)
    lab = pieces[ys, xs]
    area = np.bincount(lab, minlength=n).astype(np.float64)
    present = area > 0
    centroids = (
        np.stack([np.bincount(lab, xs, minlength=n), np.bincount(lab, ys, minlength=n)], axis=1)
        / np.maximum(area, 1)[:, None]
    )
    depth = np.zeros(n, np.float32)
    np.maximum.at(depth, lab, dist[ys, xs])
    full = depth >= full_radius_px
    sets = _DisjointSets(n)

    # Which pieces come within gap_px of each other: dilate each piece's label.
    reach = max(1, int(round(gap_px / 2)))
    grown = cv2.dilate(pieces.astype(np.float32), _disc(2 * reach + 1))
    grown_min = -cv2.dilate(-np.where(pieces > 0, pieces, n + 1).astype(np.float32), _disc(2 * reach + 1))
    both = (grown > 0) & (grown_min <= n) & (grown != grown_min)
    near = np.unique(np.stack([grown_min[both], grown[both]], axis=1).astype(np.int64), axis=0)
    pairs = {(int(a), int(b)) for a, b in near}  # grown_min <= grown: each pair once, smaller first
    ids = np.flatnonzero(present)
    d = np.hypot(*(centroids[ids, None, :] - centroids[None, ids, :]).transpose(2, 0, 1))
    for i, j in zip(*np.nonzero(np.triu(d < merge_px, k=1)), strict=True):
        pairs.add((int(ids[i]), int(ids[j])))
    for a, b in pairs:
        if not (full[a] and full[b]):
            sets.join(a, b)
    lut = np.zeros(n, np.int32)
    roots: dict[int, int] = {}
    for i in ids:
        lut[i] = roots.setdefault(sets.find(int(i)), len(roots) + 1)
    return lut[pieces]


class _FinerCopy(NamedTuple):
    """A finer copy of the field to cut the cell bodies on (see `_BodyMaps`)."""

    rgb: np.ndarray
    light: np.ndarray
    """The light surface the finder measured (thumbnail-sized; `stain.optical_density` stretches it)."""
    vectors: object
    """The finder's stain vectors (`stain.StainVectors`)."""
    um_per_px: float
    smooth_um: float


class _BodyMaps:
    """The maps cell bodies are cut on, window by window: the finder's own arrays, or a finer copy of the field.

    The finder finds nuclei at 0.8 µm/px, but a cell's outline is cut at the shared copy's 0.4 µm/px when it
    has one: the crop's mask is then as fine as before, and only the few windows around the cells are
    converted to stain amounts at the finer scale.
    """

    def __init__(self, labels, od, nuc, red, fine=None, light=None, vectors=None, sigma: float = 0.0):
        self.labels, self.od, self.nuc, self.red = labels, od, nuc, red
        self.fine, self.light, self.vectors, self.sigma = fine, light, vectors, sigma
        h, w = labels.shape
        self.shape = (h, w) if fine is None else fine.shape[:2]
        self.ry, self.rx = h / self.shape[0], w / self.shape[1]
        """Finder pixels per body pixel (1, or 0.5 with a finer copy)."""

    def box(self, r: _Region) -> tuple[int, int, int, int]:
        """A finder-scale region's window (y0, y1, x0, x1) in body pixels."""
        return (
            int(math.floor(r.y0 / self.ry)),
            min(self.shape[0], int(math.ceil(r.y1 / self.ry))),
            int(math.floor(r.x0 / self.rx)),
            min(self.shape[1], int(math.ceil(r.x1 / self.rx))),
        )

    def label_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Kept-nucleus labels in a body-pixel window (each body pixel takes the finder pixel it lies in)."""
        if self.fine is None:
            return self.labels[y0:y1, x0:x1]
        h, w = self.labels.shape
        ys = np.minimum(((np.arange(y0, y1) + 0.5) * self.ry).astype(np.intp), h - 1)
        xs = np.minimum(((np.arange(x0, x1) + 0.5) * self.rx).astype(np.intp), w - 1)
        return self.labels[np.ix_(ys, xs)]

    def stain_window(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(od, nuclear, red-cell) maps of a body-pixel window."""
        if self.fine is None:
            return self.od[y0:y1, x0:x1], self.nuc[y0:y1, x0:x1], self.red[y0:y1, x0:x1]
        # A margin for the smoothing, then the light of the same part of the field (a smooth surface).
        hf, wf = self.shape
        m = int(math.ceil(3 * self.sigma)) + 1
        py0, px0, py1, px1 = max(0, y0 - m), max(0, x0 - m), min(hf, y1 + m), min(wf, x1 + m)
        lh, lw = self.light.shape[:2]
        ly0, lx0 = min(lh - 1, int(py0 * lh / hf)), min(lw - 1, int(px0 * lw / wf))
        ly1, lx1 = max(ly0 + 1, -(-py1 * lh // hf)), max(lx0 + 1, -(-px1 * lw // wf))
        od = stain_model.optical_density(self.fine[py0:py1, px0:px1], self.light[ly0:ly1, lx0:lx1])
        nuc, red = _stain_amounts(od, self.vectors, self.sigma)
        inner = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
        return od[inner], nuc[inner], red[inner]


class _BodyCutter:
    """The whole cell (nucleus + its own cytoplasm) of each kept nucleus group, tightly, one cell per call.

    Cytoplasm is stained material next to a nucleus whose colour leans to the
    nuclear stain more than a red cell's does (basophilic cytoplasm takes up
    the azure dye; red cells take up eosin). The threshold on that lean comes
    from the field's own red cells. Each candidate pixel belongs to its nearest
    nucleus (a Voronoi split), and at most `cytoplasm_um` from it, so touching
    cells are cut between their nuclei and a red cell's rim is never a cell.

    The field-wide levels are measured once, when the cutter is made; `cut` only reads them and the
    maps, so the cells of one field can be cut in several threads at once (OpenCV and NumPy release the GIL).

    Args:
        finer: cut the bodies on this finer copy of the field (the nuclei stay the finder's, each finer pixel
            taking the label of the finder pixel it lies in); None cuts them on the finder's own maps.
    """

    def __init__(
        self,
        kept: list[_Region],
        grouped: np.ndarray,
        od: np.ndarray,
        nuc: np.ndarray,
        red: np.ndarray,
        level: float,
        cytoplasm_um: float,
        work_um: float,
        finer: _FinerCopy | None = None,
    ):
        lut = np.zeros(int(grouped.max()) + 1, np.int32)
        for k, r in enumerate(kept, start=1):
            lut[r.label] = k
        labels = lut[grouped]
        # Field-wide levels from a regular subsample of the finder's maps: the glass split and the red cells' lean.
        step = max(1, round(math.sqrt(labels.size / 100_000)))
        nuc_s, red_s, lab_s = nuc[::step, ::step], red[::step, ::step], labels[::step, ::step]
        total_s = _total_od(od[::step, ::step])
        self.glass_t = 0.5 * _glass_level(total_s)
        lean_s = nuc_s / (np.abs(nuc_s) + np.maximum(red_s, 0) + 1e-3)
        red_px = (total_s >= self.glass_t) & (lab_s == 0) & (red_s > nuc_s)
        ref = lean_s[red_px] if red_px.sum() > 50 else np.array([0.2])
        self.lean_t = min(0.6, float(np.percentile(ref, 90)) + 0.1)
        if finer is None:
            self.maps, body_um = _BodyMaps(labels, od, nuc, red), work_um
        else:
            body_um = finer.um_per_px
            self.maps = _BodyMaps(
                labels, od, nuc, red, finer.rgb, finer.light, finer.vectors, finer.smooth_um / body_um
            )
        self.kept, self.level = kept, level
        self.cytoplasm_px = cytoplasm_um / body_um
        self.smooth = _disc(max(3.0, self.cytoplasm_px / 3))
        self.pad = int(self.cytoplasm_px) + 2
        self.shape = self.maps.shape
        """The body image's (height, width)."""

    def cut(self, index: int) -> tuple[np.ndarray, int, int]:
        """(bool mask, window top, window left), in body pixels, of the cell of kept group `index`."""
        maps, pad, k = self.maps, self.pad, index + 1
        h, w = self.shape
        by0, by1, bx0, bx1 = maps.box(self.kept[index])
        y0, x0, y1, x1 = max(0, by0 - pad), max(0, bx0 - pad), min(h, by1 + pad), min(w, bx1 + pad)
        # The nearest nucleus of any pixel within reach of this one lies within 2 x reach of it:
        # the Voronoi split is exact in a window grown by pad once more.
        vy0, vx0, vy1, vx1 = max(0, y0 - pad), max(0, x0 - pad), min(h, y1 + pad), min(w, x1 + pad)
        win = maps.label_window(vy0, vy1, vx0, vx1)
        od_w, n_w, r_w = maps.stain_window(vy0, vy1, vx0, vx1)
        lean = n_w / (np.abs(n_w) + np.maximum(r_w, 0) + 1e-3)
        material = (_total_od(od_w) >= self.glass_t) & (lean > self.lean_t) & (n_w > self.level)
        # Nearest nucleus and the distance to it, in one pass.
        dist, nearest = cv2.distanceTransformWithLabels(
            (win == 0).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
        )
        owner_of_seed = np.zeros(int(nearest.max()) + 1, np.int32)
        owner_of_seed[nearest[win > 0]] = win[win > 0]
        inner = (slice(y0 - vy0, y1 - vy0), slice(x0 - vx0, x1 - vx0))
        g = win[inner] == k
        mine_owner = owner_of_seed[nearest[inner]] == k
        candidate = (material[inner] & (dist[inner] <= self.cytoplasm_px)) | (win[inner] > 0)
        mine = (candidate & mine_owner).astype(np.uint8)
        # Keep what is connected to the nucleus, smooth the outline, fill holes.
        n_comp, comp = cv2.connectedComponents(mine, connectivity=8)
        keep = np.zeros(n_comp, bool)
        keep[comp[g]] = True
        keep[0] = False
        mine = keep[comp].astype(np.uint8)
        mine = cv2.morphologyEx(mine, cv2.MORPH_CLOSE, self.smooth)
        mine = cv2.morphologyEx(mine, cv2.MORPH_OPEN, self.smooth).astype(bool)
        return _fill_holes(mine | g) & mine_owner, y0, x0


def working_copy(rgb: np.ndarray, um_per_px: float, options: FinderParams = FinderParams()) -> np.ndarray:
    """The field shrunk to the finder's working scale (itself when it is already that coarse).

    One shrink of a 12 MP frame is a good part of the finder's time: the pipeline
    makes it once and hands it to quality control, the scale check and the finder.
    """
    return _downscale(rgb, min(1.0, um_per_px / options.work_um_per_px))


def find_white_cells(
    rgb: np.ndarray, options: FinderParams = FinderParams(), small: np.ndarray | None = None, checked: bool = False
) -> list[FoundCell]:
    """Find the white cells in a stained smear field.

    Args:
        rgb: uint8 RGB field, HxWx3 (any size, from 224x224 to 12 MP).
        options: FinderParams; sizes are in microns.
        small: `working_copy(rgb, options.um_per_px, options)`, when the caller already has it (and has a
            calibrated pixel size in options.um_per_px).
        checked: the caller has already found no `field_problem` with the field or its working copy (the
            pipeline does, before quality control), so the finder does not check it again.

    Returns:
        FoundCells in field pixels, strongest stain first. Empty for a field
        with no white cell, and for a blank, saturated or one-colour image.

    Raises:
        ValueError: rgb is not a uint8 HxWx3 array.
    """
    located = locate_white_cells(rgb, options, small, checked)
    return [located.cut(i) for i in range(len(located))]


class LocatedCells:
    """The white cells of a field, located (their nuclei, strongest stain first) but not yet cut out.

    `len()` is the number of cells; `cut(i)` cuts the i-th whole cell (nucleus and cytoplasm) out at
    the finer scale and returns its FoundCell. The cuts are independent: the pipeline cuts the cells it
    keeps in worker threads, beside the model classifying the cells already cut.
    `find_white_cells` is `[located.cut(i) for i in range(len(located))]`.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        order: list[int],
        scores: list[float],
        areas_um2: list[float],
        bodies: _BodyCutter | None,
    ):
        self._shape, self._order, self._scores, self._areas, self._bodies = shape, order, scores, areas_um2, bodies

    def __len__(self) -> int:
        return len(self._order)

    def cut(self, i: int) -> FoundCell:
        """The i-th cell (strongest stain first), cut out: box and mask in field pixels."""
        k = self._order[i]
        H, W = self._shape
        cell, oy, ox = self._bodies.cut(k)
        bh, bw = self._bodies.shape
        bsx, bsy = W / bw, H / bh  # field pixels per body pixel
        cys, cxs = np.nonzero(cell)
        bx0, by0, bx1, by1 = ox + cxs.min(), oy + cys.min(), ox + cxs.max() + 1, oy + cys.max() + 1
        box = (
            max(0, int(math.floor(bx0 * bsx))),
            max(0, int(math.floor(by0 * bsy))),
            min(W, int(math.ceil(bx1 * bsx))),
            min(H, int(math.ceil(by1 * bsy))),
        )
        return FoundCell(
            box=box,
            mask=_upsample_mask(cell, (ox, oy), box, bsx, bsy),
            nucleus_area_um2=self._areas[k],
            score=self._scores[k],
            touches_border=bool(bx0 <= 0 or by0 <= 0 or bx1 >= bw or by1 >= bh),
        )


_NOTHING = LocatedCells((0, 0), [], [], [], None)


def locate_white_cells(
    rgb: np.ndarray, options: FinderParams = FinderParams(), small: np.ndarray | None = None, checked: bool = False
) -> LocatedCells:
    """`find_white_cells` in two steps: the nuclei of the whole field now, each cell's outline on demand
    (`LocatedCells.cut`). Same arguments and errors as `find_white_cells`."""
    check_rgb(rgb, "find_white_cells")
    H, W = rgb.shape[:2]
    if small is None or options.um_per_px is None:
        if not checked and field_problem(rgb) is not None:
            return _NOTHING
        um_per_px = options.um_per_px or estimate_um_per_px(rgb) or options.default_um_per_px
        small = working_copy(rgb, um_per_px, options)
    else:
        um_per_px = options.um_per_px
        if not checked and copy_problem(rgb, small) is not None:
            return _NOTHING
    # The finder's own, coarser scale: one more shrink of the working copy (a halving, from 0.4 to 0.8). The
    # nuclei are found there; the cells' outlines are cut on the working copy (see _BodyMaps).
    fine = small
    small = _downscale(fine, min(1.0, um_per_px * W / fine.shape[1] / options.find_um_per_px))
    h, w = small.shape[:2]
    sx, sy = W / w, H / h
    work_um = um_per_px * (sx + sy) / 2  # microns per working pixel

    od, nuc, red, vectors, light = _nuclear_map(small, work_um, options)
    level, low, seed_t = _levels(nuc, options.min_nuclear_od)
    min_area = math.pi / 4 * (options.min_cell_um / work_um) ** 2
    max_area = math.pi / 4 * (options.max_cell_um / work_um) ** 2
    nucleus = _segment_nuclei(
        nuc, level, low, seed_t, max(2, int(min_area / 20)), int(math.ceil(options.max_cell_um / work_um))
    ).astype(np.uint8)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_CLOSE, _disc(options.close_um / work_um))
    # A small opening drops specks (platelet fragments, dust, text strokes) before grouping.
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disc(1.0 / work_um)).astype(bool)
    nucleus = _fill_holes(nucleus)

    full_radius = options.nucleus_core_um / 2 / work_um
    pieces = _split_touching(nucleus, full_radius)
    grouped = _group(pieces, options.gap_um / work_um, full_radius, options.merge_um / work_um)
    regions, areas = _regions(grouped)
    kept, scores, areas_um2 = [], [], []
    for r in regions:
        if not min_area <= areas[r.label] <= max_area:
            continue
        g, y0, x0 = r.mask(grouped)
        # A nucleus is at least min_thickness_um thick somewhere; text strokes and scale bars are not.
        if _inscribed_radius(g) < options.min_thickness_um / 2 / work_um:
            continue
        mean_stain = float(nuc[y0 : y0 + g.shape[0], x0 : x0 + g.shape[1]][g].mean())
        if mean_stain < level + options.min_nuclear_od:
            continue
        kept.append(r)
        scores.append(float(np.clip(1.0 - seed_t / mean_stain, 0.0, 1.0)) if mean_stain > 0 else 0.0)
        areas_um2.append(float(areas[r.label] * work_um**2))
    finer = None
    if fine is not small:
        fine_um = um_per_px * (W / fine.shape[1] + H / fine.shape[0]) / 2
        finer = _FinerCopy(fine, light, vectors, fine_um, options.smooth_um)
    bodies = _BodyCutter(kept, grouped, od, nuc, red, level, options.cytoplasm_um, work_um, finer)
    order = sorted(range(len(kept)), key=lambda k: -scores[k])  # strongest stain first (stable)
    return LocatedCells((H, W), order, scores, areas_um2, bodies)


def _upsample_mask(
    mask: np.ndarray, origin: tuple[int, int], box: tuple[int, int, int, int], sx: float, sy: float
) -> np.ndarray:
    """Map a working-resolution mask (whose window starts at origin = (x, y)) onto the field-pixel box."""
    x0, y0, x1, y1 = box
    # Sample the working mask at the centre of every field pixel in the box.
    map_x = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / sx - 0.5 - origin[0])[None, :]
    map_y = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / sy - 0.5 - origin[1])[:, None]
    map_x = np.broadcast_to(map_x, (y1 - y0, x1 - x0)).astype(np.float32)
    map_y = np.broadcast_to(map_y, (y1 - y0, x1 - x0)).astype(np.float32)
    up = cv2.remap(mask.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return up > 0.5


# ----------------------------------------------------------------------------- single-cell mode


def single_cell(rgb: np.ndarray, um_per_px: float | None = None) -> FoundCell:
    """Treat the whole input as one cell (C-NMC style crop, possibly on a black background).

    Args:
        rgb: uint8 RGB crop, HxWx3.
        um_per_px: pixel size, for nucleus_area_um2; None = FinderParams().default_um_per_px.

    Returns:
        A FoundCell whose box is the whole image. Its mask is the non-background
        pixels when the crop sits on black (near-black pixels connected to the
        image edge), and all True when there is no black background.
    """
    check_rgb(rgb, "single_cell")
    h, w = rgb.shape[:2]
    scale = um_per_px or FinderParams().default_um_per_px
    # Near-black, not exactly zero: JPEG and resizing smear the pure-black surround.
    dark = (rgb.max(axis=2) <= 16).astype(np.uint8)
    n, labels = cv2.connectedComponents(dark, connectivity=8)
    edge_labels = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist()) - {0}
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
