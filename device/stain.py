"""Stain colour on a Romanowsky-stained smear field: light, optical density, stain vectors.

This module owns the colour model the white-cell finder stands on, kept apart
so that the stress corpus (which re-stains real fields into other labs' looks)
uses exactly the same model as the finder.

- Light: the field's own illumination, a smooth surface fitted to the upper
  envelope of the brightness (the empty glass), so vignetting and uneven lamps
  drop out. Each pixel's optical density (OD) is measured against it.
- Stains: by Beer-Lambert, a pixel's OD is a non-negative mix of a few stain
  colours. A Romanowsky smear has two that matter: the nuclear (azure /
  methylene-blue-DNA, violet to blue, absorbs red light) and the red-cell one
  (eosin and haemoglobin, absorbs green and blue, little red). The two
  directions are estimated on each field by Macenko's method (the plane of the
  two main directions of the OD vectors, and its extreme angles); a field that
  cannot tell (too little stain, or two directions almost alike) falls back to
  typical vectors, and says so.
- Deconvolution: the concentration of each stain per pixel, by least squares
  against (nuclear, red-cell, residual).

Nothing here assumes a hue: Wright, Giemsa, May-Grünwald-Giemsa and Leishman
differ in both directions, and pale or dark staining only scales the densities.

Image contract: float32 or uint8 RGB HxWx3; densities are float32, >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NUCLEAR_OD_DEFAULT = (0.52, 0.80, 0.30)
"""Typical OD direction of Romanowsky-stained nuclei (violet: absorbs red and green, passes blue)."""
RED_CELL_OD_DEFAULT = (0.20, 0.72, 0.66)
"""Typical OD direction of red cells (pink: absorbs green and blue, little red)."""
BLUE_CYTOPLASM_RG = 1.5
"""An OD direction absorbing red this many times more than green is basophilic cytoplasm, not a nucleus."""
MIN_STAIN_ANGLE_DEG = 10.0
"""A colour tail closer than this to the red cells is their own variation, not a second stain."""
DENSE_PLANE_DEG = 4.0
"""When the densest pixels' hue is this far from the main direction, the stain plane is spanned through them."""
HUE_TIE_SHARE = 0.04
"""Two populations whose blue shares differ by less than this are told apart by density instead of hue."""


def unit(v: np.ndarray) -> np.ndarray:
    """v scaled to length 1 (float64); a zero vector stays zero."""
    v = np.asarray(v, np.float64)
    return v / max(float(np.linalg.norm(v)), 1e-12)


@dataclass(frozen=True)
class StainVectors:
    """The two stain directions of one field, in OD space (R, G, B), each of length 1."""

    nuclear: tuple[float, float, float]
    """Nuclear stain (azure/methylene blue bound to DNA): violet, lilac or blue."""
    red_cell: tuple[float, float, float]
    """Red-cell stain (eosin + haemoglobin): pink, grey or blue-grey."""
    estimated: bool
    """True when measured on this field; False when the typical vectors were used."""

    def matrix(self) -> np.ndarray:
        """3x3 float64 rows: nuclear, red cell, and the residual direction orthogonal to both."""
        n, r = unit(self.nuclear), unit(self.red_cell)
        return np.stack([n, r, unit(np.cross(n, r))])


DEFAULT_STAINS = StainVectors(NUCLEAR_OD_DEFAULT, RED_CELL_OD_DEFAULT, estimated=False)


def illumination(rgb: np.ndarray, blocks: int = 8, full_size: bool = True) -> np.ndarray:
    """The light behind the slide: HxWx3 float32, the brightness of empty glass at each pixel.

    A quadratic surface per channel is fitted to the upper envelope of block-wise
    bright percentiles: blocks full of cells (a blast-dense corner) sit below the
    surface and are down-weighted, so they do not pull the light down with them.
    The surface is clamped to [0.5, 1.05] of the field's global white.

    Args:
        rgb: uint8 or float RGB, HxWx3.
        blocks: grid size along the longer side.
        full_size: False returns the fitted surface at thumbnail size (at most 256 px on the
            long side; `optical_density` stretches it), which saves a full-size float image.
    """
    h, w = rgb.shape[:2]
    # The light is smooth: it is measured and fitted on a thumbnail, then stretched to full size.
    shrink = min(1.0, 256 / max(h, w))
    thumb = rgb
    if shrink < 1.0:
        thumb = cv2.resize(rgb, (max(1, round(w * shrink)), max(1, round(h * shrink))), interpolation=cv2.INTER_AREA)
    thumb = thumb.astype(np.float32)
    th, tw = thumb.shape[:2]
    ones = np.ones(3, np.float32)
    lum = thumb @ ones  # summed channels (a matrix product: far faster than sum over a 3-long axis)
    # The global white: the brightest 2% of the field.
    white = np.maximum(thumb[lum >= float(np.percentile(lum, 98))].reshape(-1, 3).mean(axis=0), 1.0)
    nb_y = max(1, round(blocks * th / max(th, tw)))
    nb_x = max(1, round(blocks * tw / max(th, tw)))
    if th < 32 or tw < 32 or nb_x * nb_y < 6:
        return np.broadcast_to(white.astype(np.float32), (h, w, 3) if full_size else (th, tw, 3))
    # Each block's brightest 5% (by summed channels), all blocks at once: equal blocks of
    # bh x bw pixels (the last few rows and columns of the thumbnail are left out).
    bh, bw = th // nb_y, tw // nb_x
    blocks = thumb[: nb_y * bh, : nb_x * bw].reshape(nb_y, bh, nb_x, bw, 3).transpose(0, 2, 1, 3, 4)
    blocks = blocks.reshape(nb_y * nb_x, bh * bw, 3)
    bl = blocks @ ones
    top = (bl >= np.percentile(bl, 95, axis=1, keepdims=True)).astype(np.float32)
    vals = np.einsum("bn,bnc->bc", top, blocks) / top.sum(axis=1, keepdims=True)
    cy, cx = np.meshgrid(
        (np.arange(nb_y) + 0.5) * bh / th - 0.5, (np.arange(nb_x) + 0.5) * bw / tw - 0.5, indexing="ij"
    )
    p = np.column_stack([cx.ravel(), cy.ravel()])
    v = vals / white  # relative to the global white
    design = np.column_stack([np.ones(len(p)), p[:, 0], p[:, 1], p[:, 0] ** 2, p[:, 0] * p[:, 1], p[:, 1] ** 2])
    if len(p) < 12:
        design = design[:, :3]  # too few blocks for curvature: a plane
    gy, gx = np.mgrid[0:th, 0:tw].astype(np.float32)
    gx, gy = (gx + 0.5) / tw - 0.5, (gy + 0.5) / th - 0.5
    terms = [np.ones_like(gx), gx, gy, gx * gx, gx * gy, gy * gy][: design.shape[1]]
    small = np.empty((th, tw, 3), np.float32)
    for c in range(3):
        weights = np.ones(len(p))
        for _ in range(5):
            coef, *_ = np.linalg.lstsq(design * weights[:, None], v[:, c] * weights, rcond=None)
            resid = v[:, c] - design @ coef
            # Upper envelope: blocks well below the surface are cells, not glass.
            weights = np.where(resid < -0.03, 0.05, 1.0)
        surface = sum(t * float(k) for t, k in zip(terms, coef, strict=True))
        small[..., c] = np.clip(surface, 0.5, 1.05) * white[c]
    if (th, tw) == (h, w) or not full_size:
        return small
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


_LOG_U8 = np.log(np.arange(256, dtype=np.float32) + 1.0)
"""log(v + 1) for every uint8 value: the optical density of a uint8 image is a table look-up."""


def optical_density(rgb: np.ndarray, light: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 float32 optical density (>= 0) against the light behind the slide.

    Args:
        rgb: uint8 or float RGB, HxWx3.
        light: the illumination (as from `illumination`), at full size or as a smaller
            surface to be stretched over the field; None measures it.
    """
    h, w = rgb.shape[:2]
    if light is None:
        light = illumination(rgb, full_size=False)
    log_light = np.log(np.asarray(light, np.float32) + 1.0)
    if log_light.shape[:2] != (h, w):
        log_light = cv2.resize(log_light, (w, h), interpolation=cv2.INTER_LINEAR)
    if rgb.dtype == np.uint8:
        od = log_light - cv2.LUT(rgb, _LOG_U8)
    else:
        od = log_light - np.log(rgb.astype(np.float32) + 1.0)
    return np.maximum(od, 0.0, out=od)


def _two_gaussians(
    x: np.ndarray, iterations: int = 30, bins: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EM fit of a two-component 1-D Gaussian mixture: (weights, means, sds, responsibility of comp. 1).

    Unlike Otsu, a mixture is not pulled into the big mode when one class is a
    few percent of the pixels, and it still finds a class that is most of them.

    The fit runs on a histogram of `bins` bins (weighted EM over the bin centres, with Sheppard's
    correction of the variance for the bin width) instead of on every value: the same means and spreads
    to a fraction of a bin, at 512 rows instead of about 8,000 per iteration. The responsibilities
    returned are those of the values themselves, under the fitted mixture. Non-finite values are left out of
    the fit; with fewer than two finite values the fit is one population (weights 1 and 0).
    """
    x = np.asarray(x, np.float64)
    values = x[np.isfinite(x)]
    if values.size < 2:  # nothing to fit: one population, which no caller takes for two
        centre = float(values.mean()) if values.size else 0.0
        return np.array([1.0, 0.0]), np.full(2, centre), np.full(2, 1e-3), np.zeros(x.shape)
    lo, hi = float(values.min()), float(values.max())
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1e-6))
    width = edges[1] - edges[0]
    occupied = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[occupied]
    n = counts[occupied].astype(np.float64)
    mu = np.percentile(values, [10, 90]).astype(np.float64)
    sd = np.full(2, max(float(values.std()) / 2, 1e-3))
    w = np.array([0.5, 0.5])

    def responsibility(v: np.ndarray) -> np.ndarray:
        dens = w / sd * np.exp(-0.5 * ((v[:, None] - mu) / sd) ** 2)
        return dens / np.maximum(dens.sum(axis=1, keepdims=True), 1e-300)

    for _ in range(iterations):
        before = mu
        nr = n[:, None] * responsibility(centres)
        nk = nr.sum(axis=0) + 1e-9
        w = nk / nk.sum()
        mu = (nr * centres[:, None]).sum(axis=0) / nk
        sd = np.sqrt((nr * (centres[:, None] - mu) ** 2).sum(axis=0) / nk + width**2 / 12)
        sd = np.maximum(sd, 1e-3)
        if np.abs(mu - before).max() < 1e-3:
            break  # converged (angles in radians)
    return w, mu, sd, np.nan_to_num(responsibility(x)[:, 1])  # a non-finite value belongs to neither


def _angle_populations(flat: np.ndarray, plane: np.ndarray) -> tuple[np.ndarray, bool, np.ndarray]:
    """(angle of each OD vector in `plane`, whether there are two populations apart by more than
    their spread, responsibility of the second)."""
    proj = flat @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    w, mu, sd, resp = _two_gaussians(phi)
    return phi, bool(min(w) >= 0.003 and abs(mu[1] - mu[0]) >= 1.5 * max(sd)), resp


def estimate_stains(od: np.ndarray, min_od: float = 0.15, min_pixels: int = 200) -> StainVectors:
    """The nuclear and red-cell stain directions of one Romanowsky field.

    A Macenko-style estimate: the OD vectors of stained pixels lie near the
    plane of the two stains, and their angle in that plane runs from red-cell
    stain to nuclear stain. A field with white cells has two populations of
    angles, red cells and white cells, in whatever proportion (a blast-dense
    field has more of the second). A two-Gaussian mixture on the angle finds
    both, and each population's mean OD direction is one stain. The nuclear
    one has the smaller share of blue absorption (azure-DNA passes blue light;
    haemoglobin and eosin absorb it), whether red cells look pink, grey or
    blue-grey.

    A field with one population (no white cell) keeps its measured red-cell
    direction and takes the typical nuclear one; a field with almost no stain
    takes both typical directions.

    Args:
        od: HxWx3 (or Nx3) optical density.
        min_od: pixels with a smaller total density (glass) are ignored.
        min_pixels: with fewer stained pixels the typical vectors are returned.

    Returns:
        StainVectors; `estimated` is True only when both directions were measured.
    """
    flat = od.reshape(-1, 3)
    # A regular subsample keeps the estimate cheap on big fields (about 8,000 pixels, then the stained ones).
    flat = flat[:: max(1, flat.shape[0] // 8_000)].astype(np.float64)
    flat = flat[np.linalg.norm(flat, axis=1) > min_od]
    if flat.shape[0] < min(min_pixels, od.size // 3 // 50):
        return DEFAULT_STAINS
    _, vecs = np.linalg.eigh(flat.T @ flat)
    plane = vecs[:, [2, 1]]  # the two main directions
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    norm = np.linalg.norm(flat, axis=1)
    blue_share = lambda v: v[2] / max(v.sum(), 1e-9)  # noqa: E731
    phi, two, resp = _angle_populations(flat, plane)
    if not two:
        # A few percent of nuclei whose hue is close to the red cells' add little variance, so the
        # second main direction can be the red cells' own hue spread. The densest pixels (nuclei,
        # whatever their share) show where the second stain lies: look again (two populations, then the tail)
        # in the plane through them.
        dense = unit(flat[norm >= np.percentile(norm, 97)].mean(axis=0))
        off = dense - (dense @ plane[:, 0]) * plane[:, 0]
        if np.linalg.norm(off) > np.sin(np.radians(DENSE_PLANE_DEG)):
            plane = np.column_stack([plane[:, 0], unit(off)])
            phi, two, resp = _angle_populations(flat, plane)
    # Two populations, apart by more than their spread: red cells and white cells.
    if two:
        a = unit((flat * (1 - resp)[:, None]).sum(axis=0))
        b = unit((flat * resp[:, None]).sum(axis=0))
        if abs(blue_share(a) - blue_share(b)) >= HUE_TIE_SHARE:
            nuclear, red_cell = (a, b) if blue_share(a) < blue_share(b) else (b, a)
        else:
            # The hue cannot tell (both pass blue alike): the nuclear population is the denser one.
            dense_a = float((norm * (1 - resp)).sum() / max((1 - resp).sum(), 1e-9))
            dense_b = float((norm * resp).sum() / max(resp.sum(), 1e-9))
            nuclear, red_cell = (a, b) if dense_a > dense_b else (b, a)
        if (
            nuclear[0] > BLUE_CYTOPLASM_RG * nuclear[1]
            and blue_share(red_cell) < blue_share(unit(RED_CELL_OD_DEFAULT)) * 0.75
        ):
            # No red cells in view (a blast-dense patch, a buffy coat): the two populations are the
            # blue cytoplasm (absorbs red far more than green) and the violet nuclei.
            return StainVectors(_tup(red_cell), RED_CELL_OD_DEFAULT, estimated=False)
        if float(nuclear @ red_cell) < 0.998 and nuclear[0] >= 0.2:
            return StainVectors(_tup(nuclear), _tup(red_cell), estimated=True)
    # One population with a tail: the stained pixels are nearly all red cells, and a few white
    # cells (or platelets) make the tail. The robust extreme of the angle on the side that passes
    # blue is the nuclear direction, when it stands clearly apart from the red cells.
    red_cell = unit(flat.mean(axis=0))
    ends = [unit(plane @ np.array([np.cos(a), np.sin(a)])) for a in np.percentile(phi, [0.5, 99.5])]
    nuclear = min(ends, key=blue_share)
    apart = float(np.degrees(np.arccos(np.clip(nuclear @ red_cell, -1, 1))))
    if apart >= MIN_STAIN_ANGLE_DEG and nuclear.min() > -0.05 and blue_share(nuclear) < blue_share(red_cell):
        return StainVectors(_tup(np.clip(nuclear, 0, None)), _tup(red_cell), estimated=True)
    nuclear = unit(NUCLEAR_OD_DEFAULT)
    if blue_share(red_cell) <= blue_share(nuclear) or float(nuclear @ red_cell) > 0.99:
        return DEFAULT_STAINS
    return StainVectors(_tup(nuclear), _tup(red_cell), estimated=False)


def _tup(v: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def concentrations(od: np.ndarray, stains: StainVectors) -> np.ndarray:
    """Per-pixel stain amounts: HxWx3 float32 (nuclear, red cell, residual), by least squares."""
    inv = np.linalg.pinv(stains.matrix()).astype(np.float32)  # od = c @ M  ->  c = od @ pinv(M)
    return od.reshape(-1, 3) @ inv if od.ndim == 2 else (od @ inv).astype(np.float32)


def recompose(conc: np.ndarray, stains: StainVectors, light: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """uint8 RGB from stain amounts (the inverse of `concentrations`) under the given light."""
    od = conc.astype(np.float32) @ stains.matrix().astype(np.float32)
    rgb = (np.asarray(light, np.float32) + 1.0) * np.exp(-od) - 1.0
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
