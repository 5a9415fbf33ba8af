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
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.cells import FinderOptions, find_white_cells
from device.imaging import decode_image

Box = tuple[float, float, float, float]

WHITE_CELL_LABELS = ("WBC",)


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


def evaluate_folder(
    images_dir: str | Path,
    annotations_dir: str | Path,
    options: FinderOptions | None = None,
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
    options = options or FinderOptions()
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
            (
                p
                for ext in (".jpg", ".jpeg", ".png", ".JPG")
                if (p := images_dir / (xml.stem + ext)).exists()
            ),
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
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        recall=tp / n_true if n_true else 1.0,
        precision=tp / n_found if n_found else 1.0,
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
            print(
                f"{r['name']:<24}{r['n_true']:>6}{r['n_found']:>6}{r['tp']:>5}{r['fp']:>5}{r['fn']:>5}{flag}"
            )
        print(
            f"\n{result['images']} images, {n_true} white cells, {n_found} found: "
            f"TP {tp}  FP {fp}  FN {fn}\n"
            f"recall {result['recall']:.3f}  precision {result['precision']:.3f}  (centre inside box)\n"
            f"recall {result['recall_iou30']:.3f}  precision {result['precision_iou30']:.3f}  (IoU >= 0.3)  "
            f"mean IoU of matches {result['mean_iou']:.2f}\n"
            f"{result['seconds_per_image'] * 1000:.0f} ms per image"
        )
    return result


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
    return evaluate_folder(
        args.images_dir, args.annotations_dir, FinderOptions(um_per_px=args.um_per_px)
    )


if __name__ == "__main__":
    main()
