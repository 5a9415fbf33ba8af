"""Scoring the white-cell finder against boxes drawn by people.

This module owns the finder's yardstick: reading Pascal VOC annotations
(white-cell boxes only), matching found cells to them, and the recall /
precision of a folder of annotated fields (BCCD layout: JPEGImages/ +
Annotations/). It imports the device's finder, never the other way round.

Matching rule: a found cell matches a ground-truth white cell when the centre
of the found box lies inside the ground-truth box. BCCD boxes are hand-drawn
and some are loose, and the finder's box is the nucleus grown by a cytoplasm
estimate, so IoU swings with box style more than with whether the right cell
was found; what the classifier needs is the right cell, and a centre inside
the drawn box says exactly that. IoU >= 0.3 is reported beside it for
reference. Each ground-truth box takes at most one found cell (nearest centre
first), so a cell found twice counts one true and one false positive.

Run: python -m training.finder_eval IMAGES_DIR ANNOTATIONS_DIR
"""

from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from device.cells import FinderParams, estimate_um_per_px, find_white_cells
from device.imaging import decode_image

Box = tuple[float, float, float, float]

WHITE_CELL_LABELS = ("WBC",)
_TESTS_DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DEFAULT_BCCD = _TESTS_DATA / "bccd"
DEFAULT_CNMC = _TESTS_DATA / "cnmc-sample"


def read_voc_boxes(xml_path: str | Path, labels: Sequence[str] = WHITE_CELL_LABELS) -> list[Box]:
    """Read the boxes of the given class names from a Pascal VOC XML file.

    Returns:
        (x0, y0, x1, y1) per object, with VOC's pixel coordinates taken as they are.
    """
    root = ET.parse(xml_path).getroot()
    boxes: list[Box] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in labels:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{xml_path}: object {name!r} has no <bndbox>")
        boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _centre(b: Box) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


@dataclass(frozen=True)
class MatchResult:
    """Counts for one field."""

    true_positives: int
    false_positives: int
    false_negatives: int
    ious: tuple[float, ...]
    """IoU of each matched pair."""


def match_boxes(predicted: Sequence[Box], truth: Sequence[Box]) -> MatchResult:
    """One-to-one matching: a prediction matches a truth box that contains its centre.

    Pairs are taken greedily by centre distance, so each box is used at most once.
    """
    pairs = []
    for i, p in enumerate(predicted):
        cx, cy = _centre(p)
        for j, t in enumerate(truth):
            if t[0] <= cx <= t[2] and t[1] <= cy <= t[3]:
                tx, ty = _centre(t)
                pairs.append((np.hypot(cx - tx, cy - ty), i, j))
    used_p: set[int] = set()
    used_t: set[int] = set()
    ious = []
    for _, i, j in sorted(pairs):
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
        ious.append(iou(predicted[i], truth[j]))
    tp = len(used_p)
    return MatchResult(tp, len(predicted) - tp, len(truth) - tp, tuple(ious))


def _scores(tp: int, fp: int, fn: int) -> dict:
    """Counts with recall and precision (1.0 where nothing was there to find, or nothing was found)."""
    n_true, n_found = tp + fn, tp + fp
    return dict(
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        recall=tp / n_true if n_true else 1.0,
        precision=tp / n_found if n_found else 1.0,
    )


def evaluate_folder(
    images_dir: str | Path,
    annotations_dir: str | Path,
    options: FinderParams | None = None,
    verbose: bool = True,
) -> dict:
    """Run the finder on every annotated image and score it.

    Args:
        images_dir: folder of field images (JPEG/PNG); each needs a same-stem .xml.
        annotations_dir: folder of Pascal VOC XML files.
        options: finder options; None = the defaults (pixel size estimated per image).
        verbose: print a per-image table and the totals.

    Returns:
        dict with images, true_positives, false_positives, false_negatives, recall,
        precision, recall_iou30, precision_iou30 (IoU >= 0.3 on the matched pairs),
        mean_iou, seconds_per_image and per_image (name, n_true, n_found, tp, fp, fn).
    """
    options = options or FinderParams()
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    xmls = sorted(annotations_dir.glob("*.xml"))
    if not xmls:
        raise ValueError(f"{annotations_dir}: no Pascal VOC .xml files")
    rows = []
    tp = fp = fn = tp30 = 0
    all_ious: list[float] = []
    seconds = 0.0
    for xml in xmls:
        image_path = next(
            (p for ext in (".jpg", ".jpeg", ".png", ".JPG") if (p := images_dir / (xml.stem + ext)).exists()),
            None,
        )
        if image_path is None:
            raise ValueError(f"{images_dir}: no image for annotation {xml.name}")
        rgb = decode_image(image_path)
        truth = read_voc_boxes(xml)
        t0 = time.perf_counter()
        found = find_white_cells(rgb, options)
        seconds += time.perf_counter() - t0
        m = match_boxes([c.box for c in found], truth)
        tp, fp, fn = tp + m.true_positives, fp + m.false_positives, fn + m.false_negatives
        tp30 += sum(v >= 0.3 for v in m.ious)
        all_ious.extend(m.ious)
        rows.append(
            dict(
                name=xml.stem,
                n_true=len(truth),
                n_found=len(found),
                tp=m.true_positives,
                fp=m.false_positives,
                fn=m.false_negatives,
            )
        )
    n_true, n_found = tp + fn, tp + fp
    result = dict(
        images=len(xmls),
        **_scores(tp, fp, fn),
        recall_iou30=tp30 / n_true if n_true else 1.0,
        precision_iou30=tp30 / n_found if n_found else 1.0,
        mean_iou=float(np.mean(all_ious)) if all_ious else 0.0,
        seconds_per_image=seconds / len(xmls),
        per_image=rows,
    )
    if verbose:
        print(f"{'image':<24}{'true':>6}{'found':>6}{'tp':>5}{'fp':>5}{'fn':>5}")
        for r in rows:
            flag = "" if r["fp"] == r["fn"] == 0 else "  <-"
            print(f"{r['name']:<24}{r['n_true']:>6}{r['n_found']:>6}{r['tp']:>5}{r['fp']:>5}{r['fn']:>5}{flag}")
        print(
            f"\n{result['images']} images, {n_true} white cells, {n_found} found: "
            f"TP {tp}  FP {fp}  FN {fn}\n"
            f"recall {result['recall']:.3f}  precision {result['precision']:.3f}  (centre inside box)\n"
            f"recall {result['recall_iou30']:.3f}  precision {result['precision_iou30']:.3f}  (IoU >= 0.3)  "
            f"mean IoU of matches {result['mean_iou']:.2f}\n"
            f"{result['seconds_per_image'] * 1000:.0f} ms per image"
        )
    return result


def evaluate_fields(
    fields: Sequence[tuple[Path, Sequence[Box], float]],
    options: FinderParams | None = None,
) -> dict:
    """Score the finder on (image, truth boxes, µm per pixel) triples, with the pixel size known.

    The pixel size is passed to the finder as a calibrated rig would pass it;
    the red-cell estimate is run beside it and its relative error reported.

    Returns:
        dict with images, true_positives, false_positives, false_negatives, recall,
        precision, mean_iou, ms_per_image, scale_error (median |estimate / truth - 1|,
        None where no field could be estimated), scale_unknown (fields the estimate gave up on)
        and misses (names of fields with a false positive or negative).
    """
    base = options or FinderParams()
    tp = fp = fn = 0
    ious: list[float] = []
    errors: list[float] = []
    unknown = 0
    seconds = 0.0
    misses = []
    for path, truth, um in fields:
        rgb = decode_image(path)
        t0 = time.perf_counter()
        found = find_white_cells(rgb, replace(base, um_per_px=um))
        seconds += time.perf_counter() - t0
        m = match_boxes([c.box for c in found], truth)
        tp, fp, fn = tp + m.true_positives, fp + m.false_positives, fn + m.false_negatives
        ious.extend(m.ious)
        if m.false_positives or m.false_negatives:
            misses.append(Path(path).stem)
        estimate = estimate_um_per_px(rgb)
        if estimate is None:
            unknown += 1
        else:
            errors.append(abs(estimate / um - 1))
    return dict(
        images=len(fields),
        **_scores(tp, fp, fn),
        mean_iou=float(np.mean(ious)) if ious else 0.0,
        ms_per_image=1000 * seconds / max(1, len(fields)),
        scale_error=float(np.median(errors)) if errors else None,
        scale_unknown=unknown,
        misses=misses,
    )


TARGET_RECALL = 0.98
TARGET_PRECISION = 0.97

CNMC_UM_PER_PX = 0.045
"""Estimated pixel size of C-NMC 2019 cells (not published; see docs/scale.md): its lymphocytes and
lymphoblasts span about 175-250 px, and such cells are 8-12 µm across on a smear."""


def evaluate_corpus(root: str | Path, options: FinderParams | None = None) -> list[dict]:
    """One result row per condition folder under `root` (see training.stress), in corpus order."""
    from training.stress import CONDITIONS, read_condition

    root = Path(root)
    names = [c for c in CONDITIONS if (root / c / "truth.json").exists()]
    names += sorted(p.parent.name for p in root.glob("*/truth.json") if p.parent.name not in names)
    if not names:
        raise ValueError(f"{root}: no condition folders with truth.json (build one with --build)")
    rows = []
    for name in tqdm(names, desc="finder-eval", unit="condition"):
        r = evaluate_fields(read_condition(root / name), options)
        r["condition"] = name
        r["meets_target"] = r["recall"] >= TARGET_RECALL and r["precision"] >= TARGET_PRECISION
        rows.append(r)
    return rows


def corpus_markdown(rows: Sequence[dict]) -> str:
    """The stress table as markdown."""
    lines = [
        f"| condition | fields | white cells | recall | precision | mean IoU | ms / field | scale estimate error | "
        f"target (R ≥ {TARGET_RECALL}, P ≥ {TARGET_PRECISION}) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        scale = "cannot tell" if r["scale_error"] is None else f"{r['scale_error']:.0%}"
        if r["scale_unknown"] and r["scale_error"] is not None:
            scale += f" ({r['scale_unknown']} cannot tell)"
        lines.append(
            f"| {r['condition']} | {r['images']} | {r['true_positives'] + r['false_negatives']} | "
            f"{r['recall']:.3f} | {r['precision']:.3f} | {r['mean_iou']:.2f} | {r['ms_per_image']:.0f} | {scale} | "
            f"{'met' if r['meets_target'] else '**missed**'} |"
        )
    return "\n".join(lines) + "\n"


def crop_gallery(
    root: str | Path,
    training_dir: str | Path | None,
    out_png: str | Path,
    conditions: Sequence[str] = ("bccd", "bccd-mgg-0.4um-jpeg", "bccd-0.05um", "synth-blast-dense-0.4um"),
    per_row: int = 9,
    size: int = 128,
    training_um_per_px: float = CNMC_UM_PER_PX,
) -> Path:
    """A picture of training crops above the device's crops, all through the same preprocessing.

    The top row is the training data (C-NMC style: the cell on black, `prepare_cell`); each row
    below is what the device hands the model from one stress condition (finder mask on black,
    a fixed field of view in micrometres, `crop_cell`), so a person can judge the match.
    """
    import cv2

    from device.preprocess import PreprocessContract, crop_cell, prepare_cell
    from training.stress import read_condition

    rows: list[tuple[str, list[np.ndarray]]] = []
    train: list[np.ndarray] = []
    if training_dir is not None:
        files = sorted(p for p in Path(training_dir).rglob("*") if p.suffix.lower() in (".bmp", ".png"))
        first = decode_image(files[0]) if files else None
        fov = (first.shape[1] if first is not None else 450) * training_um_per_px
        contract = PreprocessContract(input_size=size, crop_um=fov)
        train = [prepare_cell(decode_image(p), contract) for p in files[:per_row]]
        rows.append(("training cells (real C-NMC)", train))
    else:
        contract = PreprocessContract(input_size=size, crop_um=450 * training_um_per_px)
    for name in conditions:
        folder = Path(root) / name
        if not (folder / "truth.json").exists():
            continue
        crops = []
        for path, _, um in read_condition(folder):
            rgb = decode_image(path)
            for c in find_white_cells(rgb, FinderParams(um_per_px=um)):
                if not c.touches_border:
                    crops.append(crop_cell(rgb, c.box, c.mask, contract, um_per_px=um))
            if len(crops) >= per_row:
                break
        label = f"device crops: {name}" + (" (SYNTHETIC)" if name.startswith("synth") else "")
        rows.append((label, crops[:per_row]))
    band = 22
    sheet = np.full((len(rows) * (size + band), per_row * size, 3), 255, np.uint8)
    for i, (label, crops) in enumerate(rows):
        y = i * (size + band)
        cv2.putText(sheet, label, (4, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for j, crop in enumerate(crops):
            sheet[y + band : y + band + size, j * size : (j + 1) * size] = crop
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out_png}")
    return out_png


@click.command("finder-eval")
@click.option(
    "--corpus",
    "corpus_dir",
    default="runs/finder-corpus",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Stress corpus folder (built there when missing or with --build).",
)
@click.option("--build", is_flag=True, help="(Re)build the corpus first.")
@click.option(
    "--bccd",
    "bccd_dir",
    default=str(DEFAULT_BCCD),
    show_default=True,
    type=click.Path(file_okay=False),
    help="BCCD-layout folder (JPEGImages/ + Annotations/) of real annotated fields to transform.",
)
@click.option("--synth-fields", default=20, show_default=True, help="SYNTHETIC fields per synthetic condition.")
@click.option(
    "--training-cells",
    default=str(DEFAULT_CNMC),
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of training cells (C-NMC style) for the crop gallery.",
)
@click.option("--out", "out_dir", default="runs/finder-eval", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--bundle",
    "bundle_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Also run the field-path parity check with this model bundle (training path vs device field path).",
)
def finder_eval_command(corpus_dir, build, bccd_dir, synth_fields, training_cells, out_dir, bundle_dir):
    """Score the white-cell finder per stress condition (stains, scales, JPEG, density) and draw the crop gallery."""
    from training.stress import build_corpus

    corpus, out = Path(corpus_dir), Path(out_dir)
    if build or not corpus.exists():
        bccd = Path(bccd_dir) if Path(bccd_dir, "Annotations").is_dir() else None
        if bccd is None:
            click.echo(f"no BCCD annotations under {bccd_dir}: building the SYNTHETIC conditions only", err=True)
        build_corpus(corpus, bccd, synth_fields=synth_fields)
    rows = evaluate_corpus(corpus)
    table = corpus_markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    training = Path(training_cells) if Path(training_cells).is_dir() else None
    gallery = crop_gallery(corpus, training, out / "crop_gallery.png")
    report = (
        "# White-cell finder: stress corpus\n\n"
        f"Corpus: {corpus}. Pixel size given to the finder as a calibrated rig gives it; the red-cell estimate "
        "is scored beside it. A found cell counts when its box centre lies in a true box (one to one).\n\n"
        + table
        + "\n`bccd*` rows are real photos (BCCD, MIT licence) re-stained, rescaled and recompressed; "
        "`synth-*` rows are SYNTHETIC fields.\n\n"
        f"![device crops beside training crops]({gallery.name})\n"
    )
    if bundle_dir is not None:
        from device.bundle import load_bundle
        from device.classifier import Classifier
        from training.parity import field_parity, parity_markdown

        with Classifier(load_bundle(bundle_dir), threads=2) as clf:
            parity = field_parity(clf)
        report += "\n## Field-path parity (" + str(bundle_dir) + ")\n\n" + parity_markdown(parity)
        click.echo(parity_markdown(parity))
    (out / "report.md").write_text(report, encoding="utf-8")
    (out / "finder_eval.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    click.echo(table)
    click.echo(f"report, table and crop gallery written to {out}/")
    missed = [r["condition"] for r in rows if not r["meets_target"]]
    if missed:
        click.echo(f"target missed in: {', '.join(missed)}", err=True)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: score the finder on a Pascal VOC folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images_dir")
    parser.add_argument("annotations_dir")
    parser.add_argument(
        "--um-per-px",
        type=float,
        default=None,
        help="pixel size of the images (default: estimate from red cells)",
    )
    args = parser.parse_args(argv)
    return evaluate_folder(args.images_dir, args.annotations_dir, FinderParams(um_per_px=args.um_per_px))


if __name__ == "__main__":
    main()
