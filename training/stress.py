"""The finder's stress corpus: real smear fields carried into other labs, and synthetic hard cases.

This module owns the conditions the white-cell finder is judged under, each
with ground-truth boxes:

- Real BCCD fields (Wright stain, one camera, about 0.075 µm/px), transformed
  the way another lab's photos differ: re-stained by colour deconvolution
  into Giemsa, May-Grünwald-Giemsa and Leishman looks, pale and dark, under
  white, yellowish or bluish light; rescaled to 0.05, 0.3 and 0.5 µm/px;
  JPEG-recompressed, vignetted, with a scale bar and text burnt in.
- SYNTHETIC fields from `training.synth`: sparse, blast-dense, clumped, and
  re-stained; their cells are drawn, so their boxes are exact.

Re-staining uses the finder's own colour model (`device.stain`): each field's
stain amounts are measured, then recombined with another lab's stain colours.
So it changes exactly what differs between labs (the dye colours, their
strength, the light) and keeps the morphology, which is real.

Layout on disk: ``ROOT/<condition>/<name>.(png|jpg)`` and
``ROOT/<condition>/truth.json`` = {name: {"file": "<name>.png", "boxes": [[x0, y0, x1, y1], ...],
"um_per_px": float, "synthetic": bool}}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from device import stain as stain_model
from device.imaging import decode_image
from training.finder_eval import read_voc_boxes

BCCD_UM_PER_PX = 0.075
"""BCCD's pixel size: red cells about 100 px across at 7.5 µm (the finder's estimate: median 0.080)."""


@dataclass(frozen=True)
class StainLook:
    """How a lab's stain looks: the colour of a typical nucleus and red cell, and the light."""

    nucleus_rgb: tuple[int, int, int]
    """A typical nucleus's colour on white light."""
    red_cell_rgb: tuple[int, int, int]
    """A typical red cell's colour on white light."""
    light_rgb: tuple[int, int, int] = (242, 242, 242)
    """Colour of empty glass (white, yellowish or bluish)."""


LOOKS: dict[str, StainLook] = {
    # Giemsa: purple-magenta nuclei, pinkish-grey red cells.
    "giemsa": StainLook((118, 58, 150), (214, 160, 172)),
    # May-Grünwald-Giemsa as in many ALL atlases: pale lilac nuclei, blue-grey red cells, bluish light.
    "mgg": StainLook((168, 142, 206), (178, 182, 204), (228, 236, 250)),
    # Leishman: dark purple nuclei, tan-pink red cells, yellowish (halogen) light.
    "leishman": StainLook((92, 52, 128), (226, 168, 150), (250, 240, 214)),
    # Wright, under-stained (pale) and over-stained (dark).
    "pale": StainLook((176, 160, 222), (236, 206, 210)),
    "dark": StainLook((64, 28, 112), (186, 110, 128)),
}


BCCD_STAINS = stain_model.StainVectors(nuclear=(0.486, 0.874, 0.020), red_cell=(0.364, 0.737, 0.570), estimated=True)
"""The BCCD lab's stain, measured once: the two-population estimate on the OD of all 87 `val`
fields pooled (20,000 pixels of each). It is a constant on purpose: the corpus is the finder's
ground truth, so it must not move when the stain estimator under test changes."""


def restain(rgb: np.ndarray, look: StainLook, source: stain_model.StainVectors | None = None) -> np.ndarray:
    """Re-stain a Romanowsky field into another lab's look, keeping every structure where it is.

    The field's stain amounts are measured (illumination, optical density,
    Macenko vectors, deconvolution), scaled so that a typical nucleus and a
    typical red cell reach the target look's densities, and recombined with
    the target's stain colours under its light. The residual (what neither
    stain explains: refraction, dirt) is kept as it was.
    """
    light = stain_model.illumination(rgb)
    od = stain_model.optical_density(rgb, light)
    source = source or stain_model.estimate_stains(od)
    conc = stain_model.concentrations(od, source)
    target_n = np.log(255.0 / np.asarray(look.nucleus_rgb, np.float64))
    target_r = np.log(255.0 / np.asarray(look.red_cell_rgb, np.float64))
    target = stain_model.StainVectors(
        tuple(stain_model.unit(target_n)), tuple(stain_model.unit(target_r)), estimated=False
    )
    # Typical amounts: the dark tail of the nuclear stain, the middle of the red-cell stain.
    n_typ = max(float(np.percentile(conc[..., 0], 99.5)), 0.2)
    red_px = conc[..., 1] > 0.5 * float(np.percentile(conc[..., 1], 95))
    r_typ = max(float(np.median(conc[..., 1][red_px])) if red_px.any() else 0.3, 0.1)
    out = conc.copy()
    out[..., 0] *= np.linalg.norm(target_n) / n_typ
    out[..., 1] *= np.linalg.norm(target_r) / r_typ
    relative_light = light / light.reshape(-1, 3).max(axis=0)
    new_light = relative_light * np.asarray(look.light_rgb, np.float32)
    # The residual direction of the target differs; express the old residual in OD and add it back.
    residual_od = conc[..., 2:3] * source.matrix()[2].astype(np.float32)
    od_new = out[..., :2] @ target.matrix()[:2].astype(np.float32) + residual_od
    img = (new_light + 1.0) * np.exp(-od_new) - 1.0
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def rescale(rgb: np.ndarray, boxes: Sequence[Sequence[float]], factor: float):
    """Resize a field by `factor` (area filter when shrinking) and its boxes with it."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    out = cv2.resize(rgb, size, interpolation=interp)
    return out, [[v * factor for v in b] for b in boxes]


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through JPEG at the given quality (camera and phone artefacts)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def vignette(rgb: np.ndarray, strength: float = 0.45) -> np.ndarray:
    """Darken towards the corners (a lamp not centred, a small sensor behind a big objective)."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w * 0.42) / (w / 2)) ** 2 + ((yy - h * 0.45) / (h / 2)) ** 2
    gain = 1.0 - strength * np.clip(r2 / 2.0, 0, 1)
    return np.clip(rgb.astype(np.float32) * gain[..., None], 0, 255).astype(np.uint8)


def burn_in_labels(rgb: np.ndarray, um_per_px: float) -> np.ndarray:
    """A black 10 µm scale bar with its label in one corner, and a text stamp in another."""
    out = rgb.copy()
    h, w = out.shape[:2]
    bar = max(4, int(round(10 / um_per_px)))
    thick = max(2, h // 80)
    x0, y0 = w - bar - w // 20, h - h // 12
    cv2.rectangle(out, (x0, y0), (x0 + bar, y0 + thick), (0, 0, 0), -1)
    scale = max(0.3, h / 900)
    cv2.putText(out, "10 um", (x0, y0 - thick), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(1, thick // 2))
    cv2.putText(
        out,
        "LAB-2 100x oil 2024-03-11",
        (w // 40, h // 14),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (20, 20, 20),
        max(1, thick // 2),
    )
    return out


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Transform:
    """How one condition changes a real field."""

    look: str | None = None
    """Re-stain into this LOOKS entry; None keeps the original stain."""
    um_per_px: float | None = None
    """Rescale to this pixel size; None keeps BCCD's."""
    jpeg_quality: int | None = None
    """Recompress at this JPEG quality."""
    labels: bool = False
    """Vignette the light and burn a scale bar and a text stamp in."""


BCCD_CONDITIONS: dict[str, Transform] = {
    "bccd": Transform(),
    "bccd-giemsa": Transform(look="giemsa"),
    "bccd-mgg": Transform(look="mgg"),
    "bccd-leishman": Transform(look="leishman"),
    "bccd-pale": Transform(look="pale"),
    "bccd-dark": Transform(look="dark"),
    "bccd-0.05um": Transform(um_per_px=0.05),
    "bccd-0.3um": Transform(um_per_px=0.3, jpeg_quality=85),
    "bccd-0.5um": Transform(um_per_px=0.5, jpeg_quality=85),
    "bccd-mgg-0.4um-jpeg": Transform(look="mgg", um_per_px=0.4, jpeg_quality=70),
    "bccd-jpeg-vignette-text": Transform(jpeg_quality=40, labels=True),
}
SYNTH_CONDITIONS = (
    "synth-sparse",
    "synth-blast-dense",
    "synth-blast-dense-0.4um",
    "synth-clumps",
    "synth-mgg-dense",
)
CONDITIONS = tuple(BCCD_CONDITIONS) + SYNTH_CONDITIONS


BCCD_AMENDMENTS: dict[str, list[list[float]]] = {
    # A monocyte cut by the top edge, with a violet nucleus and grey-blue cytoplasm, that the
    # BCCD annotators left unboxed (every other edge-cut white cell in the set is boxed).
    "BloodImage_00228": [[262.0, 0.0, 430.0, 146.0]],
}
"""White cells missing from BCCD's annotations, added to the corpus truth (checked by eye)."""


def transform_bccd(
    condition: str, rgb: np.ndarray, boxes: list, source: stain_model.StainVectors = BCCD_STAINS
) -> tuple[np.ndarray, list, float]:
    """One BCCD field under one condition: (image, boxes, µm per pixel); `source` = BCCD's stains."""
    t = BCCD_CONDITIONS[condition]
    um = BCCD_UM_PER_PX
    if t.look:
        rgb = restain(rgb, LOOKS[t.look], source)
    if t.um_per_px:
        rgb, boxes = rescale(rgb, boxes, um / t.um_per_px)
        um = t.um_per_px
    if t.labels:
        rgb = burn_in_labels(vignette(rgb), um)
    if t.jpeg_quality:
        rgb = jpeg(rgb, t.jpeg_quality)
    return rgb, boxes, um


def synth_field(condition: str, seed: int) -> tuple[np.ndarray, list, float]:
    """One SYNTHETIC field under one condition: (image, boxes, µm per pixel)."""
    from training import synth

    rng = np.random.default_rng(seed)
    stain = synth.random_stain(rng)
    if condition == "synth-mgg-dense":
        # The synthetic drawing is not Beer-Lambert, so it is not re-stained by deconvolution:
        # its own stain model draws the pale lilac nuclei and bluish light of May-Grünwald-Giemsa.
        stain = synth.Stain(
            nucleus_hue_deg=12.0,
            cytoplasm_hue_deg=-10.0,
            intensity=0.6,
            gain=1.05,
            cast=(0.93, 0.97, 1.05),
            blur_um=stain.blur_um,
        )
    if condition == "synth-sparse":
        um = float(rng.choice([0.08, 0.12, 0.2]))
        n, labels, gap = int(rng.integers(1, 4)), None, 1.0
    elif condition == "synth-clumps":
        um, n, labels, gap = 0.15, 4, None, -1.0
    elif condition == "synth-blast-dense-0.4um":
        # Drawn at 0.1 µm/px and shrunk to a 224 px phone/USB-camera field at 0.4 µm/px.
        um, n, gap = 0.1, int(rng.integers(6, 10)), -1.5
        labels = ["all" if rng.random() < 0.85 else "hem" for _ in range(n)]
    else:  # blast-dense: most nucleated cells are blasts, touching
        um, n, gap = 0.2, int(rng.integers(8, 13)), -0.5
        labels = ["all" if rng.random() < 0.85 else "hem" for _ in range(n)]
    size = (896, 896) if condition.endswith("0.4um") else (640, 480)
    for count in range(n, 0, -1):
        try:
            rgb, cells = synth.render_field(
                rng,
                *size,
                n_white=count,
                um_per_px=um,
                labels=labels[:count] if labels else None,
                stain=stain,
                gap_um=gap,
            )
            break
        except ValueError:
            continue
    boxes = [c["box"] for c in cells]
    if condition == "synth-mgg-dense":
        rgb = jpeg(rgb, 80)
    if condition.endswith("0.4um"):
        rgb, boxes = rescale(rgb, boxes, um / 0.4)
        rgb, um = jpeg(rgb, 80), 0.4
    return rgb, boxes, um


def build_corpus(
    out: str | Path,
    bccd_dir: str | Path | None,
    conditions: Iterable[str] = CONDITIONS,
    per_condition: int | None = None,
    synth_fields: int = 20,
    seed: int = 0,
    image_format: str = "png",
) -> dict[str, int]:
    """Write the stress corpus under `out`; returns the image count per condition.

    Args:
        out: corpus root.
        bccd_dir: a BCCD-layout folder (JPEGImages/ + Annotations/); None skips the BCCD conditions.
        conditions: which conditions to build.
        per_condition: at most this many BCCD fields per condition (None = all).
        synth_fields: synthetic fields per synthetic condition.
        seed: seed of the synthetic fields.
        image_format: "png" (lossless, the default) or "jpg" (quality 95: a small slice to commit).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out)
    counts: dict[str, int] = {}
    sources = []
    if bccd_dir is not None:
        bccd_dir = Path(bccd_dir)
        xmls = sorted((bccd_dir / "Annotations").glob("*.xml"))[: per_condition or None]
        if not xmls:
            raise ValueError(f"{bccd_dir}: no Annotations/*.xml (expected the BCCD layout)")
        sources = [(x.stem, bccd_dir / "JPEGImages" / f"{x.stem}.jpg", x) for x in xmls]
    for condition in tqdm(list(conditions), desc="stress corpus", unit="condition"):
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
        folder = out / condition
        folder.mkdir(parents=True, exist_ok=True)
        truth: dict[str, dict] = {}
        if condition.startswith("bccd"):
            for stem, image, xml in sources:
                truth_boxes = read_voc_boxes(xml) + [tuple(b) for b in BCCD_AMENDMENTS.get(stem, [])]
                rgb, boxes, um = transform_bccd(condition, decode_image(image), truth_boxes, BCCD_STAINS)
                truth[stem] = _write(folder, f"{stem}.{image_format}", rgb, boxes, um, synthetic=False)
        else:
            for i in range(synth_fields):
                rgb, boxes, um = synth_field(condition, seed * 1000 + i)
                name = f"synth_{i:03d}"
                truth[name] = _write(folder, f"{name}.{image_format}", rgb, boxes, um, synthetic=True)
        (folder / "truth.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
        counts[condition] = len(truth)
    (out / "README.md").write_text(_README, encoding="utf-8")
    return counts


def _write(folder: Path, filename: str, rgb: np.ndarray, boxes, um: float, synthetic: bool) -> dict:
    # Lossless PNG by default: JPEG artefacts are part of a condition only where the condition says so.
    path = folder / filename
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if filename.endswith(".jpg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write {path}")
    return {
        "file": filename,
        "boxes": [[round(float(v), 1) for v in b] for b in boxes],
        "um_per_px": um,
        "synthetic": synthetic,
    }


def read_condition(folder: str | Path) -> list[tuple[Path, list, float]]:
    """(image path, boxes, µm per pixel) for each field of one condition folder."""
    folder = Path(folder)
    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    return [
        (folder / t.get("file", f"{name}.png"), [tuple(b) for b in t["boxes"]], float(t["um_per_px"]))
        for name, t in truth.items()
    ]


_README = """# LeukoCam finder stress corpus

Made by `leukocam finder-eval --build` (training/stress.py). Each folder is one condition;
`truth.json` holds the white-cell boxes and the pixel size of each field.

- `bccd*`: real photos from the BCCD dataset (MIT licence, see LICENSE), transformed:
  re-stained by colour deconvolution, rescaled, JPEG-recompressed, vignetted, labelled.
  The morphology and the boxes are real; the colours and scales are simulated.
- `synth-*`: SYNTHETIC fields drawn by training/synth.py. Not patient data; for testing only.
"""
