"""Synthetic white-cell images and smear fields for tests, demos and smoke training.

This module owns LeukoCam's synthetic data: single segmented cells in the style
of C-NMC 2019 (a cell centred on black, labelled "all" for a leukemic
lymphoblast or "hem" for a normal lymphocyte), whole Wright/Giemsa-like
peripheral smear fields with red cells, platelets and a few white cells, and
the writers that lay them out on disk. Everything written is marked as
synthetic (a README and a JSON key): none of it is patient data and none of it
may be used to judge clinical performance.

The morphology follows the textbook contrast. Blasts are larger, with a high
nucleus-to-cytoplasm ratio, fine open chromatin, visible nucleoli and at times
an indented nucleus; normal lymphocytes are small, with a dense round nucleus,
coarse clumped chromatin and a thin rim of cytoplasm. Each cell draws one
hidden "blastness" score, and every feature follows it.

Single cells (`render_cell`) imitate C-NMC 2019's segmented cells, checked
against nine real ones (tests/data/cnmc-sample, and the side-by-side figure
`leukocam synth figure` draws): cells of 7-13 um at C-NMC's pixel scale,
membranes with bumps and blebs, scant to moderate cytoplasm, dull purple
stain. Colour is formed in optical density (Beer-Lambert) from a per-subject
stain (`random_cell_stain`: stain direction and density, lamp, focus, sensor
noise, JPEG), so a model trained on them cannot learn one colour. Their score
distributions are 5 sd apart, so a well-trained model separates the two
classes (the demo model's job), and int8 rounding has little to flip. Smear
fields keep their own Wright/Giemsa look and a more overlapping score.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed
gives byte-identical images. Only numpy, OpenCV and the standard library are
used; drawing is done with cv2 primitives and array operations on small
regions, never per pixel in Python.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

LABELS = ("all", "hem")
CELL_IMAGE_SIDE = 450
"""Side of a C-NMC cell image, and of the synthetic ones at their default size."""
SYNTH_CELL_UM_PER_PX = 0.045
"""Pixel size of a 450 px synthetic cell image: C-NMC's estimated scale (docs/scale.md). An image of
`size` px has CELL_IMAGE_SIDE * SYNTH_CELL_UM_PER_PX / size um per pixel."""
GENERATOR_NAME = "leukocam.training.synth"
FOLDS = 3

# Mean of the hidden blastness score per label; the spread makes the classes
# overlap (separation 0.46 / 0.14 ~ 3.3 sd: about 95% at best).
_BLASTNESS_MEAN = {"all": 0.73, "hem": 0.27}
_BLASTNESS_SD = 0.14

# Wright/Giemsa-like base colours (RGB, 0-255), before the stain's variation.
_NUC_DENSE = (78.0, 44.0, 138.0)  # dark violet, condensed chromatin (lymphocyte)
_NUC_OPEN = (138.0, 104.0, 196.0)  # lighter purple, open chromatin (blast)
# Every stained colour is darker than the glass (_FIELD_BG) in every channel, as light through a stained
# cell must be (Beer-Lambert): cytoplasm is blue because it absorbs red, not because it adds blue.
_NUCLEOLUS = (166.0, 150.0, 194.0)  # pale lavender-blue spot
_CYTO_PALE = (166.0, 186.0, 198.0)  # pale blue rim of a lymphocyte
_CYTO_BASO = (136.0, 164.0, 192.0)  # more basophilic blast cytoplasm
_PLATELET = (128.0, 92.0, 182.0)  # purple granules, same hue as nuclei
_FIELD_BG = (204.0, 201.0, 200.0)  # near-white, slightly pink-grey background
# Optical density per unit red-cell thickness: hemoglobin absorbs green and
# blue far more than red, which makes overlapping cells pink and darker.
_RBC_OD = np.array([0.13, 0.30, 0.30], dtype=np.float32)
_RBC_DIAMETER_UM = 7.5
_PLATELET_DIAMETER_UM = (2.0, 3.0)

_README = """SYNTHETIC DATA - NOT REAL PATIENT DATA
======================================

Every image in this folder is SYNTHETIC. It was drawn by LeukoCam's generator
({generator}) with seed {seed}. {what}

These images contain no patient data. They exist to test, demonstrate and
smoke-train the LeukoCam software. They are NOT suitable for clinical
evaluation, for estimating diagnostic accuracy, or for any medical decision.
"""


@dataclass(frozen=True)
class Stain:
    """Per-subject (per-slide) stain and illumination variation.

    The defaults are a neutral stain: no shift, no cast, light blur.
    """

    nucleus_hue_deg: float = 0.0
    """Hue rotation of the nucleus colours, in degrees."""
    cytoplasm_hue_deg: float = 0.0
    """Hue rotation of the cytoplasm colours, in degrees."""
    intensity: float = 1.0
    """Stain uptake: scales the saturation of nucleus and cytoplasm colours."""
    gain: float = 1.0
    """Illumination brightness multiplier for the whole image."""
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel (R, G, B) multiplier: lamp colour / white-balance cast."""
    blur_um: float = 0.08
    """Gaussian blur sigma in micrometres (focus), converted to pixels per image."""


def random_stain(rng: np.random.Generator) -> Stain:
    """Draw a plausible stain/illumination variation for one subject or slide.

    Args:
        rng: the random generator to draw from.

    Returns:
        A Stain whose colours stay Wright/Giemsa-like (nuclei violet, cytoplasm blue).
    """
    cast = 1.0 + rng.normal(0.0, 0.03, size=3)
    return Stain(
        nucleus_hue_deg=float(rng.normal(0.0, 6.0)),
        cytoplasm_hue_deg=float(rng.normal(0.0, 8.0)),
        intensity=float(rng.uniform(0.85, 1.15)),
        gain=float(rng.uniform(0.9, 1.08)),
        cast=(float(cast[0]), float(cast[1]), float(cast[2])),
        blur_um=float(rng.uniform(0.04, 0.16)),
    )


@dataclass(frozen=True)
class _Morphology:
    """Per-cell morphology drawn from the hidden blastness score."""

    blastness: float
    diameter_um: float
    nc_ratio: float  # nucleus radius / cell radius
    cell_irregularity: float
    nucleus_irregularity: float
    notch_depth: float  # 0 = round nucleus; fraction of the nucleus radius
    coarse_chromatin: float
    fine_chromatin: float
    nucleoli: int
    nucleoli_visibility: float


def _check_label(label: str) -> None:
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")


def _sample_morphology(rng: np.random.Generator, label: str) -> _Morphology:
    """Draw one cell's morphology; every feature follows one overlapping score."""
    _check_label(label)
    m = float(np.clip(rng.normal(_BLASTNESS_MEAN[label], _BLASTNESS_SD), 0.0, 1.0))
    notch = rng.random() < 0.45 * m
    return _Morphology(
        blastness=m,
        # Lymphocytes ~ 8-11 um, blasts ~ 12-18 um, overlapping in the middle.
        diameter_um=float(np.clip(8.6 + 9.0 * m + rng.normal(0.0, 0.8), 7.5, 18.5)),
        nc_ratio=float(np.clip(0.74 + 0.13 * m + rng.normal(0.0, 0.03), 0.62, 0.93)),
        cell_irregularity=float(0.015 + 0.03 * rng.random()),
        nucleus_irregularity=float(0.02 + 0.04 * m * rng.random()),
        notch_depth=float(rng.uniform(0.15, 0.35)) if notch else 0.0,
        coarse_chromatin=float(np.clip(0.06 + 0.42 * (1.0 - m) + rng.normal(0, 0.04), 0.0, 0.6)),
        fine_chromatin=float(np.clip(0.08 + 0.14 * m + rng.normal(0, 0.02), 0.0, 0.4)),
        nucleoli=int(rng.integers(1, 4)),
        nucleoli_visibility=float(np.clip((m - 0.42) / 0.25, 0.0, 1.0)),
    )


def _shift_colour(rgb: tuple[float, float, float], hue_deg: float, sat: float) -> np.ndarray:
    """Rotate an RGB colour's hue and scale its saturation (HLS space)."""
    h, lightness, s = colorsys.rgb_to_hls(*(c / 255.0 for c in rgb))
    r, g, b = colorsys.hls_to_rgb((h + hue_deg / 360.0) % 1.0, lightness, min(1.0, s * sat))
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _lerp(a: tuple[float, ...], b: tuple[float, ...], t: float) -> tuple[float, float, float]:
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale_px: float) -> np.ndarray:
    """Zero-mean, unit-sd noise with features about scale_px wide (float32 HxW)."""
    step = max(1.0, scale_px)
    gh, gw = int(math.ceil(h / step)) + 2, int(math.ceil(w / step)) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * step), int(gh * step)), interpolation=cv2.INTER_CUBIC)
    big = big[:h, :w]
    sd = float(big.std())
    return (big - float(big.mean())) / (sd if sd > 1e-6 else 1.0)


def _outline(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    irregularity: float,
    notch_depth: float = 0.0,
    elongation: float = 0.0,
) -> np.ndarray:
    """A closed, gently irregular outline (N x 2 float) around (cx, cy)."""
    theta = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        r += rng.normal(0.0, irregularity / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r += elongation * np.cos(2.0 * (theta - rng.uniform(0, np.pi)))
    if notch_depth > 0.0:
        # An indentation (cleft) of the nuclear outline, as in many blasts.
        centre = rng.uniform(0, 2 * np.pi)
        d = np.angle(np.exp(1j * (theta - centre)))
        r -= notch_depth * np.exp(-((d / 0.35) ** 2))
    r *= radius
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def _fill(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    """Anti-aliased filled polygon as a float32 coverage mask in [0, 1]."""
    mask = np.zeros(shape, dtype=np.uint8)
    shift = 3  # sub-pixel vertices so small cells keep smooth edges
    ipts = np.round(pts * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [ipts], 255, lineType=cv2.LINE_AA, shift=shift)
    return mask.astype(np.float32) / 255.0


def _white_cell_patch(
    rng: np.random.Generator, morph: _Morphology, stain: Stain, px_per_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one white cell centred in a square patch.

    Returns:
        (rgb, alpha): float32 patch colours (0-255, RGB, before gain/cast/blur)
        and the cell's coverage in [0, 1]. The patch centre is the cell centre.
    """
    radius = 0.5 * morph.diameter_um * px_per_um
    half = int(math.ceil(radius * 1.25)) + 3
    n = 2 * half + 1
    c = float(half)

    cell = _fill(
        (n, n),
        _outline(rng, c, c, radius, morph.cell_irregularity, elongation=rng.uniform(0, 0.06)),
    )
    n_radius = radius * morph.nc_ratio
    # Off-centre nucleus: the thin cytoplasm rim is often wider on one side.
    slack = radius * (1.0 - morph.nc_ratio) * rng.uniform(0.1, 0.6)
    ang = rng.uniform(0, 2 * np.pi)
    ncx, ncy = c + slack * math.cos(ang), c + slack * math.sin(ang)
    nucleus = _fill(
        (n, n),
        _outline(
            rng,
            ncx,
            ncy,
            n_radius,
            morph.nucleus_irregularity,
            morph.notch_depth,
            rng.uniform(0, 0.05),
        ),
    )
    nucleus = cv2.GaussianBlur(nucleus, (0, 0), max(0.4, 0.02 * n_radius)) * cell

    m = morph.blastness
    nuc_tone = float(np.clip(m + rng.normal(0.0, 0.08), 0.0, 1.0))
    nuc_col = _shift_colour(_lerp(_NUC_DENSE, _NUC_OPEN, nuc_tone), stain.nucleus_hue_deg, stain.intensity)
    cyto_col = _shift_colour(_lerp(_CYTO_PALE, _CYTO_BASO, m), stain.cytoplasm_hue_deg, stain.intensity)
    nucleolus_col = _shift_colour(_NUCLEOLUS, stain.nucleus_hue_deg, stain.intensity)

    # Chromatin: coarse clumps (dark blobs with light gaps) for lymphocytes,
    # a fine even stipple for blasts.
    # tanh sharpens the smooth noise into distinct clumps with clear gaps.
    coarse = np.tanh(1.6 * _smooth_noise(rng, n, n, max(1.5, n_radius / 5.0)))
    fine = _smooth_noise(rng, n, n, max(1.0, n_radius / 14.0))
    shade = 1.0 - 0.5 * morph.coarse_chromatin * coarse + 0.35 * morph.fine_chromatin * fine
    nuc_rgb = nuc_col[None, None, :] * np.clip(shade, 0.45, 1.5)[..., None]

    if morph.nucleoli_visibility > 0.0:
        spots = _nucleoli(
            rng, n, (ncx, ncy), n_radius, morph.nucleoli, (0.15, 0.45, 0.75), max(0.5, 0.25 * n_radius * 0.12)
        )
        w = (0.8 * morph.nucleoli_visibility * np.clip(spots, 0, 1) * nucleus)[..., None]
        nuc_rgb = nuc_rgb * (1.0 - w) + nucleolus_col[None, None, :] * w

    cyto_rgb = cyto_col[None, None, :] * (1.0 + 0.04 * _smooth_noise(rng, n, n, max(1.5, radius / 5)))[..., None]
    nw = nucleus[..., None]
    rgb = cyto_rgb * (1.0 - nw) + nuc_rgb * nw
    return rgb.astype(np.float32), cell


def _nucleoli(
    rng: np.random.Generator,
    n: int,
    centre: tuple[float, float],
    n_radius: float,
    count: int,
    shape: tuple[float, float, float],
    blur_px: float,
) -> np.ndarray:
    """Soft nucleolus spots (float32 n x n, about 0-1) inside a nucleus of radius n_radius at centre.

    `shape` is (largest radius as a fraction of n_radius, farthest offset from the centre as a fraction of
    n_radius, least axis ratio); each spot is an ellipse drawn at 1/8 px, blurred by blur_px."""
    largest, reach, ratio = shape
    spots = np.zeros((n, n), dtype=np.float32)
    for _ in range(count):
        rr = n_radius * rng.uniform(0.08, largest)
        d = n_radius * reach * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * np.pi)
        at = (int(round((centre[0] + d * math.cos(a)) * 8)), int(round((centre[1] + d * math.sin(a)) * 8)))
        axes = (max(1, int(rr * 8)), max(1, int(rr * rng.uniform(ratio, 1.0) * 8)))
        cv2.ellipse(spots, at, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA, 3)
    return cv2.GaussianBlur(spots, (0, 0), blur_px)


def _finish(img: np.ndarray, stain: Stain, blur_px: float, rng: np.random.Generator) -> np.ndarray:
    """Apply illumination, focus blur and sensor noise to a float RGB image, in place where possible."""
    if blur_px > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), blur_px)
    img *= (stain.gain * np.asarray(stain.cast, dtype=np.float32))[None, None, :]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 2.0
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Single segmented cells, C-NMC 2019 style: a cell photographed through a stain, segmented, on black.
#
# Colour is drawn in optical density (Beer-Lambert), as light through a stained cell forms it: the camera
# sees I = I0 * exp(-sum_k c_k * OD_k), one term per stain (the nuclear azure/haematoxylin-like stain and
# the cytoplasm's), so a denser stain darkens every channel in a fixed ratio, and a subject's stain is a
# direction and a density, not a hue. The cell is drawn on its glass, blurred, given sensor noise and JPEG
# compression as a camera would, and only then cut out and put on black, so its rim carries the blur of
# the glass as segmented real cells do.

# Unit stain directions in OD (R, G, B). The nuclear stain absorbs green most (violet); C-NMC's dense, dull
# purple and a brighter Wright/Giemsa lilac bound the per-subject blend (measured on the nine real C-NMC
# cells: nucleus about RGB (60-95, 25-50, 70-100) under a ~235 lamp, OD about (1.3, 2.1, 1.1)).
_NUC_OD_CNMC = np.array([0.47, 0.78, 0.40], dtype=np.float32)
_NUC_OD_WRIGHT = np.array([0.52, 0.83, 0.26], dtype=np.float32)
_CYTO_OD_BLUE = np.array([0.93, 0.36, 0.05], dtype=np.float32)  # absorbs red: pale blue cytoplasm

_CELL_SCORE_MEAN = {"all": 0.78, "hem": 0.22}
_CELL_SCORE_SD = 0.11
"""Hidden blastness of a single cell per label: 0.56 / 0.11 = 5 sd apart (a Bayes AUC above 0.999), so a
well-trained model separates the classes and int8 rounding has little to flip. The fields keep their own,
more overlapping score (_BLASTNESS_*)."""


@dataclass(frozen=True)
class CellStain:
    """One subject's stain, lamp and camera for single-cell images (C-NMC style), in optical density."""

    nucleus_od: tuple[float, float, float] = (0.49, 0.80, 0.32)
    """Unit OD direction of the nuclear stain (R, G, B)."""
    nucleus_density: float = 2.3
    """OD magnitude of dense (condensed) chromatin."""
    cytoplasm_od: tuple[float, float, float] = (0.60, 0.55, 0.22)
    """OD of the cytoplasm (a blend of the nuclear stain and a blue basophilic one), magnitude included."""
    lamp: tuple[float, float, float] = (232.0, 230.0, 234.0)
    """Light through bare glass (R, G, B, 0-255): lamp colour and white balance."""
    blur_um: float = 0.1
    """Gaussian focus blur, sigma in micrometres."""
    noise: float = 2.0
    """Sensor noise, sd in 0-255 units."""
    jpeg_quality: int | None = None
    """JPEG quality the camera saved with; None for a lossless image (C-NMC's BMPs)."""

    @classmethod
    def from_stain(cls, stain: Stain) -> CellStain:
        """The single-cell stain that a field `Stain` describes (hue shift, uptake, lamp gain and cast, focus)."""
        nucleus = _rotate_od(_NUC_OD_CNMC * 0.5 + _NUC_OD_WRIGHT * 0.5, stain.nucleus_hue_deg)
        cyto = _rotate_od(0.45 * nucleus + 0.25 * _CYTO_OD_BLUE, stain.cytoplasm_hue_deg)
        lamp = 232.0 * stain.gain * np.asarray(stain.cast, dtype=np.float32)
        return cls(
            nucleus_od=_triple(nucleus),
            nucleus_density=2.3 * stain.intensity,
            cytoplasm_od=_triple(cyto * stain.intensity),
            lamp=_triple(lamp),
            blur_um=stain.blur_um,
        )


def _triple(v) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _rotate_od(od: np.ndarray, hue_deg: float) -> np.ndarray:
    """Rotate an OD direction's hue by hue_deg, keeping its magnitude (the stain's colour, not its amount)."""
    norm = float(np.linalg.norm(od))
    colour = 255.0 * np.exp(-od / max(norm, 1e-6))  # the stain's colour at unit density
    shifted = _shift_colour(_triple(colour), hue_deg, 1.0)
    out = -np.log(np.clip(shifted, 1.0, 255.0) / 255.0)
    return (out / max(float(np.linalg.norm(out)), 1e-6) * norm).astype(np.float32)


def random_cell_stain(rng: np.random.Generator, spread: float = 1.0) -> CellStain:
    """Draw one subject's stain, lamp and camera: from C-NMC's dense dull purple to a pale Wright lilac, pink,
    grey or blue-grey, any lamp balance, in or slightly out of focus, lossless or JPEG.

    `spread` scales every draw's distance from the middle of its range: 1 is the full range (the demo model's
    data), 0 one house stain and camera. The same draws are made whatever the spread."""

    def around(x: float, centre: float) -> float:
        return x if spread == 1.0 else centre + spread * (x - centre)

    t = around(float(rng.uniform(0.0, 0.6)), 0.3)
    nucleus = (1.0 - t) * _NUC_OD_CNMC + t * _NUC_OD_WRIGHT
    shift = np.exp(spread * rng.normal(0.0, 0.06, 3)).astype(np.float32)
    nucleus = _rotate_od(nucleus * shift, spread * float(rng.normal(0, 7)))
    nucleus /= float(np.linalg.norm(nucleus))
    density = float(np.exp(math.log(2.6) + spread * rng.normal(0.0, 0.2)))  # pale to dark: about 1.7-3.9
    cyto = (
        around(float(rng.uniform(0.3, 0.8)), 0.55) * nucleus * density
        + around(float(rng.uniform(0.05, 0.35)), 0.2) * _CYTO_OD_BLUE
    )
    lamp = around(float(rng.uniform(205.0, 250.0)), 228.0) * np.exp(spread * rng.normal(0.0, 0.04, 3))
    return CellStain(
        nucleus_od=_triple(nucleus),
        nucleus_density=density,
        cytoplasm_od=_triple(cyto),
        lamp=_triple(np.clip(lamp, 150.0, 255.0)),
        blur_um=around(float(rng.uniform(0.04, 0.22)), 0.13),
        noise=around(float(rng.uniform(0.5, 4.0)), 2.25),
        jpeg_quality=None if rng.random() < 0.5 else int(rng.integers(55, 96)),
    )


@dataclass(frozen=True)
class _CellShape:
    """One segmented cell's morphology, every feature following one hidden blastness score m."""

    blastness: float
    diameter_um: float
    nc_ratio: float  # nucleus radius / cell radius: scant (0.95) to moderate (0.7) cytoplasm
    outline_irregularity: float
    bumps: float  # amplitude of the small high-frequency bumps of the membrane
    nucleus_irregularity: float
    cleft_depth: float  # an indentation of the nucleus, fraction of its radius
    clumping: float  # coarse chromatin clumps (mature lymphocytes)
    stipple: float  # fine even chromatin (blasts)
    nucleus_paleness: float  # open chromatin takes up less stain
    nucleoli: int
    nucleolus_visibility: float


def _sample_cell_shape(rng: np.random.Generator, label: str) -> _CellShape:
    _check_label(label)
    m = float(np.clip(rng.normal(_CELL_SCORE_MEAN[label], _CELL_SCORE_SD), 0.0, 1.0))
    return _CellShape(
        blastness=m,
        # C-NMC's cells at its scale: about 170-260 px of 450 (7.7-11.7 um); blasts larger, overlapping.
        diameter_um=float(np.clip(7.9 + 3.4 * m + rng.normal(0.0, 0.55), 6.8, 12.8)),
        nc_ratio=float(np.clip(0.80 + 0.08 * m + rng.normal(0.0, 0.05), 0.66, 0.97)),
        outline_irregularity=float(rng.uniform(0.015, 0.05)),
        bumps=float(rng.uniform(0.0, 0.025)),
        nucleus_irregularity=float(0.015 + 0.05 * m * rng.random()),
        cleft_depth=float(rng.uniform(0.1, 0.3)) if rng.random() < 0.1 + 0.4 * m else 0.0,
        clumping=float(np.clip(0.05 + 0.45 * (1.0 - m) + rng.normal(0.0, 0.05), 0.0, 0.6)),
        stipple=float(np.clip(0.05 + 0.15 * m + rng.normal(0.0, 0.02), 0.0, 0.3)),
        nucleus_paleness=float(np.clip(0.12 * m + rng.normal(0.0, 0.04), 0.0, 0.3)),
        nucleoli=int(rng.integers(1, 4)),
        nucleolus_visibility=float(np.clip((m - 0.45) / 0.2, 0.0, 1.0)),
    )


def _membrane(rng: np.random.Generator, c: float, radius: float, shape: _CellShape) -> np.ndarray:
    """The cell outline: low-order irregularity plus small bumps and the odd bleb, as real membranes have."""
    pts = _outline(rng, c, c, radius, shape.outline_irregularity, elongation=rng.uniform(0, 0.06))
    theta = np.linspace(0.0, 2.0 * np.pi, len(pts), endpoint=False)
    r = np.ones_like(theta)
    for k in range(6, 15):
        r += rng.normal(0.0, shape.bumps / math.sqrt(k - 5)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.poisson(0.6))):  # blebs
        d = np.angle(np.exp(1j * (theta - rng.uniform(0, 2 * np.pi))))
        r += rng.uniform(0.03, 0.08) * np.exp(-((d / rng.uniform(0.12, 0.25)) ** 2))
    return c + (pts - c) * r[:, None]


def _cell_density_maps(
    rng: np.random.Generator, shape: _CellShape, px_per_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nuclear-stain density, cytoplasm coverage and cell mask (float32, n x n) of one cell, centred."""
    radius = 0.5 * shape.diameter_um * px_per_um
    half = int(math.ceil(radius * 1.3)) + 3
    n = 2 * half + 1
    c = float(half)
    cell = _fill((n, n), _membrane(rng, c, radius, shape))
    n_radius = radius * shape.nc_ratio
    slack = radius * (1.0 - shape.nc_ratio) * rng.uniform(0.1, 0.7)
    ang = rng.uniform(0, 2 * np.pi)
    ncx, ncy = c + slack * math.cos(ang), c + slack * math.sin(ang)
    outline = _outline(rng, ncx, ncy, n_radius, shape.nucleus_irregularity, shape.cleft_depth, rng.uniform(0, 0.06))
    nucleus = cv2.GaussianBlur(_fill((n, n), outline), (0, 0), max(0.4, 0.03 * n_radius)) * cell

    # Chromatin: dense clumps with pale gaps (mature lymphocyte) or a fine even stipple (blast).
    clumps = np.tanh(1.8 * _smooth_noise(rng, n, n, max(1.5, n_radius / 4.0)))
    stipple = _smooth_noise(rng, n, n, max(1.0, n_radius / 12.0))
    density = (1.0 - shape.nucleus_paleness) * (1.0 + 0.5 * shape.clumping * clumps + 0.6 * shape.stipple * stipple)
    density = np.clip(density, 0.3, 1.6)
    if shape.nucleolus_visibility > 0.0:
        spots = _nucleoli(rng, n, (ncx, ncy), n_radius, shape.nucleoli, (0.16, 0.5, 0.7), max(0.5, 0.03 * n_radius))
        density *= 1.0 - 0.5 * shape.nucleolus_visibility * np.clip(spots, 0.0, 1.0)
    cytoplasm = (cell * (1.0 - nucleus)) * (1.0 + 0.06 * _smooth_noise(rng, n, n, max(1.5, radius / 5.0)))
    return (density * nucleus).astype(np.float32), cytoplasm.astype(np.float32), cell


def _cell_od(nuclear: np.ndarray, cytoplasm: np.ndarray, stain: CellStain) -> np.ndarray:
    """Optical density (float32 n x n x 3) of a cell's nuclear-stain and cytoplasm maps under a stain."""
    return (stain.nucleus_density * nuclear)[..., None] * np.asarray(stain.nucleus_od, np.float32) + cytoplasm[
        ..., None
    ] * np.asarray(stain.cytoplasm_od, np.float32)


def _photograph(
    nuclear: np.ndarray, cytoplasm: np.ndarray, stain: CellStain, px_per_um: float, rng: np.random.Generator
) -> np.ndarray:
    """Light through the stained cell on glass, as the camera records it (float32 RGB 0-255)."""
    img = np.asarray(stain.lamp, np.float32) * np.exp(-_cell_od(nuclear, cytoplasm, stain))
    if stain.blur_um * px_per_um > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), stain.blur_um * px_per_um)
    img += rng.standard_normal(img.shape, dtype=np.float32) * stain.noise
    if stain.jpeg_quality is not None:
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(_to_uint8(img), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, stain.jpeg_quality]
        )
        img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32)
    return img


def render_cell(
    rng: np.random.Generator, label: str, size: int = 450, stain: CellStain | Stain | None = None
) -> np.ndarray:
    """Render one segmented white cell centred on black, C-NMC 2019 style.

    Args:
        rng: the random generator (all randomness comes from it).
        label: "all" (leukemic lymphoblast) or "hem" (normal lymphocyte).
        size: output width and height in pixels (C-NMC uses 450).
        stain: the subject's `CellStain` (see `random_cell_stain`); a field `Stain` is translated; None is
            a neutral stain.

    Returns:
        uint8 RGB array of shape (size, size, 3); pixels outside the cell are 0.
    """
    _check_label(label)
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    if stain is None:
        stain = CellStain()
    elif isinstance(stain, Stain):
        stain = CellStain.from_stain(stain)
    shape = _sample_cell_shape(rng, label)
    # One magnification for every cell, as in C-NMC, so the blast/lymphocyte size difference is real: a
    # 450 px image spans 450 x SYNTH_CELL_UM_PER_PX = 20.25 um.
    px_per_um = size / (CELL_IMAGE_SIDE * SYNTH_CELL_UM_PER_PX)
    nuclear, cytoplasm, cell = _cell_density_maps(rng, shape, px_per_um)
    rgb = _photograph(nuclear, cytoplasm, stain, px_per_um, rng)
    # Segmentation: a hard-edged mask (C-NMC's), slightly inside the blurred boundary.
    rgb *= (cell > 0.5).astype(np.float32)[..., None]
    out = np.zeros((size, size, 3), dtype=np.float32)
    jitter = rng.integers(-max(1, size // 50), max(1, size // 50) + 1, size=2)
    p = rgb.shape[0]
    x0 = size // 2 - p // 2 + int(jitter[0])
    y0 = size // 2 - p // 2 + int(jitter[1])
    _paste(out, rgb, np.ones(cell.shape, np.float32), x0, y0)
    return _to_uint8(out)


def _paste(dst: np.ndarray, src: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend src (h, w, 3) into dst at (x0, y0), clipping at dst's edges."""
    h, w = src.shape[:2]
    H, W = dst.shape[:2]
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    dx1, dy1 = min(W, x0 + w), min(H, y0 + h)
    if dx1 <= dx0 or dy1 <= dy0:
        return
    s = src[sy0 : sy0 + dy1 - dy0, sx0 : sx0 + dx1 - dx0]
    a = alpha[sy0 : sy0 + dy1 - dy0, sx0 : sx0 + dx1 - dx0, None]
    roi = dst[dy0:dy1, dx0:dx1]
    roi *= 1.0 - a
    roi += s * a


def _draw_red_cells(rng: np.random.Generator, h: int, w: int, um_per_px: float) -> np.ndarray:
    """Accumulate red-cell thickness (float32 HxW) from many overlapping biconcave discs."""
    thickness = np.zeros((h, w), dtype=np.float32)
    r_mean = 0.5 * _RBC_DIAMETER_UM / um_per_px
    coverage = rng.uniform(0.3, 0.6)
    count = int(coverage * (h + 2 * r_mean) * (w + 2 * r_mean) / (math.pi * r_mean**2))
    half = int(math.ceil(r_mean * 1.3)) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    for _ in range(count):
        a = r_mean * (1.0 + rng.normal(0.0, 0.07))
        b = a * rng.uniform(0.82, 1.0)
        t = rng.uniform(0, np.pi)
        ct, st = math.cos(t), math.sin(t)
        u = (xx * ct + yy * st) / a
        v = (-xx * st + yy * ct) / b
        r = np.sqrt(u * u + v * v)
        # Paler centre (central pallor) and an anti-aliased rim about 1 px wide.
        pallor = rng.uniform(0.45, 0.75)
        disc = (1.0 - pallor * np.exp(-((r / 0.5) ** 2))) * np.clip((1.0 - r) * a, 0.0, 1.0)
        disc *= rng.uniform(0.85, 1.15)
        cx = int(rng.uniform(-r_mean, w + r_mean))
        cy = int(rng.uniform(-r_mean, h + r_mean))
        x0, y0 = cx - half, cy - half
        sx0, sy0 = max(0, -x0), max(0, -y0)
        dx0, dy0 = max(0, x0), max(0, y0)
        dx1, dy1 = min(w, x0 + 2 * half + 1), min(h, y0 + 2 * half + 1)
        if dx1 > dx0 and dy1 > dy0:
            thickness[dy0:dy1, dx0:dx1] += disc[sy0 : sy0 + dy1 - dy0, sx0 : sx0 + dx1 - dx0]
    return thickness


def _draw_platelets(rng: np.random.Generator, h: int, w: int, um_per_px: float, n_rbc_area: float) -> np.ndarray:
    """Platelet coverage mask (float32 HxW): small purple granular dots, 2-3 um."""
    mask = np.zeros((h, w), dtype=np.uint8)
    r_rbc = 0.5 * _RBC_DIAMETER_UM / um_per_px
    count = int(rng.uniform(0.04, 0.1) * n_rbc_area / (math.pi * r_rbc**2)) + 1
    for _ in range(count):
        d = rng.uniform(*_PLATELET_DIAMETER_UM) / um_per_px
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        for _ in range(int(rng.integers(1, 4))):  # a few granules per platelet
            rr = 0.5 * d * rng.uniform(0.45, 0.7)
            ox, oy = rng.normal(0, 0.18 * d, size=2)
            centre = (int((cx + ox) * 8), int((cy + oy) * 8))
            axes = (max(1, int(rr * 8)), max(1, int(rr * rng.uniform(0.6, 1.0) * 8)))
            cv2.ellipse(mask, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 3)
    return mask.astype(np.float32) / 255.0


def render_field(
    rng: np.random.Generator,
    width: int = 1280,
    height: int = 960,
    n_white: int = 3,
    um_per_px: float = 0.1,
    labels: list[str] | None = None,
    stain: Stain | None = None,
    gap_um: float = 1.0,
    masks: list | None = None,
    cell_style: str = "smear",
) -> tuple[np.ndarray, list[dict]]:
    """Render a synthetic Wright/Giemsa peripheral smear field with a few white cells.

    Args:
        rng: the random generator (all randomness comes from it).
        width: field width in pixels (up to 4056 in reasonable time).
        height: field height in pixels.
        n_white: number of white cells, placed without overlap and fully inside.
        um_per_px: scale in micrometres per pixel (red cells are 7.5 um wide).
        labels: one label per white cell ("all" or "hem"); None draws them at random.
            When given, its length must equal n_white.
        stain: the slide's stain variation; None is a neutral stain.
        gap_um: least distance between two white cells' boxes; negative lets boxes
            overlap by that much, so cells touch (clumps, blast-dense fields).
        masks: a list to receive each white cell's true extent: a bool HxW mask of the field
            (the ideal segmentation, as C-NMC's organisers cut their cells).
        cell_style: "smear" draws the white cells in the field's Wright/Giemsa look (lilac nuclei, pale blue
            cytoplasm); "cnmc" draws the single cells of `render_cell` (the cells the demo model learns),
            their optical density laid over the field's glass under the field's stain.

    Returns:
        (field, cells): uint8 RGB array (height, width, 3), and one dict per white
        cell ``{"box": [x0, y0, x1, y1], "label": ...}`` in pixels, x1/y1 exclusive.

    Raises:
        ValueError: on bad arguments or when the white cells do not fit the field.
    """
    if width < 32 or height < 32 or um_per_px <= 0:
        raise ValueError(f"need width, height >= 32 and um_per_px > 0, got {width}x{height}, {um_per_px}")
    if labels is None:
        labels = [LABELS[int(i)] for i in rng.integers(0, 2, size=n_white)]
    elif len(labels) != n_white:
        raise ValueError(f"labels has {len(labels)} entries but n_white is {n_white}")
    for label in labels:
        _check_label(label)
    if cell_style not in ("smear", "cnmc"):
        raise ValueError(f"cell_style must be 'smear' or 'cnmc', got {cell_style!r}")
    stain = stain or Stain()
    cell_stain = CellStain.from_stain(stain)

    # Background with a slight vignette and mottle, as an uneven lamp gives.
    yv = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xv = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    light = 1.0 - 0.06 * (xv * xv + yv * yv) * 0.5
    light = light + 0.015 * _smooth_noise(rng, height, width, max(8.0, min(height, width) / 6.0))
    field = np.empty((height, width, 3), dtype=np.float32)
    for ch in range(3):
        field[..., ch] = light * _FIELD_BG[ch]

    thickness = _draw_red_cells(rng, height, width, um_per_px)
    for ch in range(3):
        field[..., ch] *= np.exp(-_RBC_OD[ch] * thickness)

    plt_mask = _draw_platelets(rng, height, width, um_per_px, float(height * width))
    plt_col = _shift_colour(_PLATELET, stain.nucleus_hue_deg, stain.intensity)
    a = 0.85 * plt_mask
    for ch in range(3):
        field[..., ch] += a * (plt_col[ch] - field[..., ch])

    cells: list[dict] = []
    placed: list[tuple[int, int, int, int]] = []
    margin = max(2, int(gap_um / um_per_px)) if gap_um > 0 else int(round(gap_um / um_per_px))
    for label in labels:
        if cell_style == "cnmc":
            nuclear, cytoplasm, alpha = _cell_density_maps(rng, _sample_cell_shape(rng, label), 1.0 / um_per_px)
            rgb = np.asarray(_FIELD_BG, np.float32) * np.exp(-_cell_od(nuclear, cytoplasm, cell_stain))
        else:
            rgb, alpha = _white_cell_patch(rng, _sample_morphology(rng, label), stain, 1.0 / um_per_px)
        ys, xs = np.nonzero(alpha > 0.02)
        # The cell's own extent in the patch, padded one pixel for the focus
        # blur that spreads the edge afterwards; placement uses this, not the
        # padded patch, so large blasts still fit small fields.
        bx0, by0 = int(xs.min()) - 1, int(ys.min()) - 1
        bx1, by1 = int(xs.max()) + 2, int(ys.max()) + 2
        if bx1 - bx0 > width or by1 - by0 > height:
            raise ValueError(f"a {bx1 - bx0} px white cell does not fit a {width}x{height} field")
        for _ in range(500):
            x0 = int(rng.integers(-bx0, width - bx1 + 1))
            y0 = int(rng.integers(-by0, height - by1 + 1))
            box = [x0 + bx0, y0 + by0, x0 + bx1, y0 + by1]
            if all(
                box[2] + margin <= q[0] or q[2] + margin <= box[0] or box[3] + margin <= q[1] or q[3] + margin <= box[1]
                for q in placed
            ):
                break
        else:
            raise ValueError(f"could not place {len(labels)} white cells in a {width}x{height} field")
        placed.append(tuple(box))
        _paste(field, rgb, alpha, x0, y0)
        cells.append({"box": box, "label": label})
        if masks is not None:
            whole = np.zeros((height, width), np.float32)
            _paste(whole[..., None], np.ones((*alpha.shape, 1), np.float32), alpha, x0, y0)
            masks.append(whole > 0.5)

    field = _finish(field, stain, stain.blur_um / um_per_px, rng)
    return _to_uint8(field), cells


def _write_readme(out_dir: Path, seed: int, what: str) -> None:
    text = _README.format(generator=GENERATOR_NAME, seed=seed, what=what)
    (out_dir / "SYNTHETIC_README.txt").write_text(text, encoding="utf-8")


def _write_image(path: Path, rgb: np.ndarray, params: list[int] | None = None) -> None:
    # cv2 writes BGR; our arrays are RGB everywhere else.
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params or []):
        raise OSError(f"could not write image {path}")


def write_cell_dataset(
    out_dir: str | Path,
    n_subjects: int = 10,
    cells_per_subject: int = 20,
    size: int = 450,
    seed: int = 0,
    blast_fraction: float | None = None,
    stain_spread: float = 1.0,
) -> dict:
    """Write a synthetic single-cell dataset in the C-NMC 2019 folder layout.

    Layout: ``out_dir/training_data/fold_{0,1,2}/{all,hem}/UID_<subject>_<image>_<cell>_<label>.bmp``.
    ALL subjects have numeric IDs and only "all" cells; healthy subjects have IDs
    starting with "H" and only "hem" cells. Subjects go to folds round-robin and
    each subject has its own stain.

    Args:
        out_dir: destination folder (created if needed).
        n_subjects: number of subjects (patients plus healthy donors).
        cells_per_subject: images per subject.
        size: image width and height in pixels.
        seed: random seed; the same seed writes the same images.
        blast_fraction: fraction of subjects that are ALL patients (default 0.5).
        stain_spread: how far subjects' stains, lamps and cameras range (`random_cell_stain`): 1 the full
            range; smaller for tests that must train a discriminating model in seconds on a few subjects.

    Returns:
        A summary: counts per class, per subject and per fold, the seed, synthetic=True.
    """
    if n_subjects < 1 or cells_per_subject < 1:
        raise ValueError("n_subjects and cells_per_subject must be at least 1")
    fraction = 0.5 if blast_fraction is None else float(blast_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"blast_fraction must be in [0, 1], got {blast_fraction}")
    out = Path(out_dir)
    root = out / "training_data"
    for fold in range(FOLDS):
        for label in LABELS:
            (root / f"fold_{fold}" / label).mkdir(parents=True, exist_ok=True)
    _write_readme(
        out,
        seed,
        "It imitates the folder layout and file naming of the C-NMC 2019 dataset "
        "(segmented single white cells on black); subject IDs are invented.",
    )

    rng = np.random.default_rng(seed)
    n_all = int(round(n_subjects * fraction))
    kinds = ["all"] * n_all + ["hem"] * (n_subjects - n_all)
    kinds = [kinds[i] for i in rng.permutation(n_subjects)]  # mix kinds across folds
    subjects: list[tuple[str, str, int]] = []
    counter = {"all": 0, "hem": 0}
    for i, kind in enumerate(kinds):
        counter[kind] += 1
        sid = str(counter[kind]) if kind == "all" else f"H{counter[kind]}"
        subjects.append((sid, kind, i % FOLDS))

    per_class = {label: 0 for label in LABELS}
    per_subject: dict[str, int] = {}
    per_fold = {f"fold_{f}": 0 for f in range(FOLDS)}
    total = n_subjects * cells_per_subject
    with tqdm(total=total, desc="synthetic cells", unit="img", disable=total <= 200) as bar:
        for sid, label, fold in subjects:
            stain = random_cell_stain(rng, stain_spread)
            for j in range(cells_per_subject):
                # C-NMC names carry the capture (image) and the cell within it.
                name = f"UID_{sid}_{j // 3 + 1}_{j % 3 + 1}_{label}.bmp"
                img = render_cell(rng, label, size=size, stain=stain)
                _write_image(root / f"fold_{fold}" / label / name, img)
                per_class[label] += 1
                per_subject[sid] = per_subject.get(sid, 0) + 1
                per_fold[f"fold_{fold}"] += 1
                bar.update(1)

    return {
        "synthetic": True,
        "generator": GENERATOR_NAME,
        "seed": seed,
        "size": size,
        "um_per_px": CELL_IMAGE_SIDE * SYNTH_CELL_UM_PER_PX / size,
        "n_images": total,
        "per_class": per_class,
        "per_subject": per_subject,
        "per_fold": per_fold,
        "subject_fold": {sid: fold for sid, _, fold in subjects},
        "root": str(root),
    }


def write_fields(
    out_dir: str | Path,
    n: int = 3,
    width: int = 1280,
    height: int = 960,
    n_white: tuple[int, int] = (2, 5),
    um_per_px: float = 0.1,
    seed: int = 0,
    cell_style: str = "smear",
) -> list[Path]:
    """Write synthetic smear fields as JPEG files with JSON annotations beside them.

    Args:
        out_dir: destination folder (created if needed).
        n: number of fields.
        width: field width in pixels.
        height: field height in pixels.
        n_white: inclusive (min, max) white cells per field.
        um_per_px: scale in micrometres per pixel.
        seed: random seed; the same seed writes the same fields.
        cell_style: how the white cells are drawn (`render_field`): "smear" or "cnmc".

    Returns:
        The paths of the written ``field_NNNN.jpg`` files, in order.
    """
    lo, hi = n_white
    if not 0 <= lo <= hi:
        raise ValueError(f"n_white must be (min, max) with 0 <= min <= max, got {n_white}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_readme(
        out,
        seed,
        "Each field_NNNN.jpg is a drawn peripheral blood smear field; field_NNNN.json "
        "next to it lists the white cells' boxes and labels.",
    )
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for i in tqdm(range(n), desc="synthetic fields", unit="field", disable=n <= 20):
        stain = random_stain(rng)
        count = int(rng.integers(lo, hi + 1))
        field, cells = render_field(rng, width, height, count, um_per_px, stain=stain, cell_style=cell_style)
        path = out / f"field_{i:04d}.jpg"
        _write_image(path, field, [cv2.IMWRITE_JPEG_QUALITY, 92])
        meta = {
            "synthetic": True,
            "generator": GENERATOR_NAME,
            "seed": seed,
            "index": i,
            "um_per_px": um_per_px,
            "cell_style": cell_style,
            "width": width,
            "height": height,
            "cells": cells,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def comparison_figure(real_dir: str | Path, out_path: str | Path, seed: int = 0, tile: int = 150) -> Path:
    """A side-by-side figure: the real cells under real_dir (top row) above SYNTHETIC cells, half "all" and half
    "hem", each with its own random stain (two rows). Every tile is labelled; the synthetic rows say SYNTHETIC."""
    real = sorted(p for p in Path(real_dir).rglob("*") if p.suffix.lower() in (".png", ".bmp", ".jpg", ".jpeg"))
    if not real:
        raise ValueError(f"no cell images under {real_dir}")
    real = real[:9]
    n = len(real)

    def label(img: np.ndarray, text: str) -> np.ndarray:
        out = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
        return out

    rows = [[label(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), "real " + p.stem[4:]) for p in real]]
    rng = np.random.default_rng(seed)
    for _ in range(2):
        kinds = ["all"] * ((n + 1) // 2) + ["hem"] * (n // 2)
        rows.append([label(render_cell(rng, k, 450, random_cell_stain(rng)), f"SYNTHETIC {k}") for k in kinds])
    figure = np.vstack([np.hstack(r) for r in rows])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_image(out, figure, [cv2.IMWRITE_JPEG_QUALITY, 88] if out.suffix.lower() in (".jpg", ".jpeg") else None)
    return out
