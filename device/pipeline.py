"""From a field image to classified cells: quality, find, crop, classify, CAM.

`Analyzer` is built once (it holds the classifier) and is called per field. It
returns a typed `FieldAnalysis` with per-stage timings and each cell's heatmap
already encoded (one cell per thread, beside the model); packaging it into
stored rows is `to_record`'s job, so the same analysis serves the camera loop,
uploads and benchmarks. The archival copies (the cells' crop PNGs and the field
JPEG) are encoded after the result is stored (`encode_crops`, `encode_field`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from device import cells as finder
from device.classifier import CellPrediction, Classifier
from device.config import Config
from device.errors import ImageError
from device.heatmap import evidence_overlay
from device.imaging import as_rgb8, check_rgb, encode_image
from device.preprocess import crop_cell, prepare_cell
from device.quality import QualityReport, assess
from device.store import CaptureRecord, CellRecord
from device.store.duplicates import crop_dhash

FIELD_JPEG_QUALITY = 90
"""Quality of the archival field JPEG."""
HEATMAP_JPEG_QUALITY = 90
"""The heatmap overlay is a picture for people (JPEG, ten times faster to encode than PNG); the crop,
which is the model's input and can become training data, stays lossless PNG."""
_CHECKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukocam-qc")
"""Quality control runs here, beside the finder (OpenCV releases the GIL)."""
_CELL_WORK = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="leukocam-cells")
"""Per-cell work beside the model, one cell per task: each kept cell is cut out of the field (its outline), and
its heatmap overlay drawn, its crop hashed and the overlay encoded (NumPy, OpenCV and Pillow's libjpeg release
the GIL)."""
CLASSIFY_BATCH = 1
"""Crops per interpreter call. One keeps the interpreter's working memory small (a 300 px B3 at batch 8 needs
about 20 MB more at the peak) for a few percent of int8 speed per crop."""


@dataclass(frozen=True)
class ClassifiedCell:
    """One found and classified cell in memory: pixel arrays, the prediction, and the heatmap as it is stored.

    `to_record` packages it into a `device.store.CellRecord`, which is what is stored.
    """

    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 in field pixels (x1, y1 exclusive)."""
    probability: float
    """Blast probability from the model, 0-1."""
    logit: float
    label: str
    positive: bool
    needs_review: bool
    """Inside the review band: a person decides."""
    crop: np.ndarray
    """The model's input, uint8 RGB S x S."""
    heatmap: np.ndarray
    """The crop with its signed CAM overlaid on the bundle's fixed scale (device.heatmap), uint8 RGB S x S."""
    cam: np.ndarray | None = None
    """The signed class activation map (float32 h x w; positive = evidence for blast)."""
    dhash: int | None = None
    """Perceptual hash of the crop, for finding the same cell stored twice in a slide (device.store.duplicates)."""
    heatmap_jpeg: bytes = b""
    """The heatmap, encoded as it is stored (JPEG); empty: `to_record` encodes `heatmap`."""


@dataclass(frozen=True)
class FieldAnalysis:
    status: str
    """"ok", or "retake" when the quality gate failed or no white cell was found."""
    message: str
    quality: QualityReport
    cells: tuple[ClassifiedCell, ...]
    skipped: int
    """White cells found beyond finder.max_cells and not classified."""
    um_per_px: float | None
    timings_ms: dict
    """Milliseconds per stage: scale, find, qc, crop, classify, cells."""
    width: int
    height: int
    working: np.ndarray | None = None
    """The field shrunk to the shared 0.4 µm/px working copy (the field check, QC and the finder, which halves
    it once more), for the scale check that follows a good result; None for single cells, uncalibrated
    fields that were refused, and images that are no field at all."""
    cam_scale: float | None = None
    """|CAM| at which the heatmaps reach full colour (the classifier's fixed scale)."""


class Analyzer:
    """The on-device analysis of one field. Build once; call `analyse` per field."""

    def __init__(self, classifier: Classifier, config: Config):
        self.classifier = classifier
        self.config = config
        self.contract = classifier.bundle.contract

    def analyse(self, field: np.ndarray, single_cell: bool = False) -> FieldAnalysis:
        """Analyse a uint8 RGB field (or, with single_cell, an image that is already one cell).

        A field that cannot be a smear (blank, black, saturated, one flat
        colour, too small) gets status "retake" with the reason, and no cells.
        """
        timings: dict[str, float] = {}
        notes: list[str] = []
        field, bad = as_rgb8(field)
        if bad is not None:
            return _refused(f"cannot analyse this image: {bad}")
        t = time.perf_counter()
        calibrated = self.config.finder.um_per_px or None
        small = None
        if calibrated is not None and not single_cell:
            # One shrink of the frame, shared by the field check, quality control, the scale check and the
            # finder (a blank, saturated or noise frame is told as well on the copy, at a fraction of the cost).
            small = finder.working_copy(field, calibrated)
        problem = (
            finder.field_problem(field, on_black=single_cell) if small is None else finder.copy_problem(field, small)
        )
        um, review_scale = self._pixel_size(field, single_cell, notes) if problem is None else (None, False)
        if problem is None and not single_cell and small is None:
            small = finder.working_copy(field, um or self.default_um)
        timings["scale"] = _ms(t)
        # Quality control runs beside the finder on the shared copy (OpenCV and NumPy release the
        # GIL); its report is collected when the cells are found. (The scale check of a calibrated
        # rig runs after the result: see Appliance._after_result.)
        qc_future = _CHECKS.submit(self._quality, field if small is None or calibrated is None else small, single_cell)
        t = time.perf_counter()
        limit = self.config.finder.max_cells
        if problem is not None:
            cutting, skipped = [], 0
        elif single_cell:
            cutting, skipped = [_done(finder.single_cell(field))], 0
        else:
            options = finder.FinderParams(um_per_px=um or self.default_um)
            located = finder.locate_white_cells(field, options, small=small, checked=True)
            skipped = max(0, len(located) - limit)
            # The cells kept (strongest stain first) are cut out in worker threads, beside the model
            # classifying the cells already cut.
            cutting = [_CELL_WORK.submit(located.cut, i) for i in range(min(limit, len(located)))]
        timings["find"] = _ms(t)
        qc, timings["qc"] = qc_future.result()

        cells = self._classify_cells(field, cutting, um, single_cell, timings)
        t = time.perf_counter()  # the last cells' pictures may still be being made
        pictures = [drawing.result() for *_, drawing in cells]
        results = tuple(
            ClassifiedCell(
                box=tuple(int(v) for v in c.box),
                probability=p.probability,
                logit=p.logit,
                label=p.label,
                positive=p.positive,
                needs_review=p.needs_review or review_scale,
                crop=crop,
                heatmap=heatmap,
                cam=p.cam,
                dhash=dhash,
                heatmap_jpeg=heatmap_jpeg,
            )
            for (c, p, crop, _), (heatmap, dhash, heatmap_jpeg) in zip(cells, pictures, strict=True)
        )
        timings["cells"] = _ms(t)

        problems = list(qc.problems)
        if problem is not None:
            problems.append(problem)
        elif not results:
            problems.append("no white cell found: move to a field with white cells, check focus and stain, and retake")
        status = "retake" if problems else "ok"
        message = "; ".join(problems) if problems else f"{len(results)} white cell(s) classified"
        if notes:
            message += " (" + "; ".join(notes) + ")"
        return FieldAnalysis(
            status,
            message,
            qc,
            results,
            skipped,
            um,
            timings,
            field.shape[1],
            field.shape[0],
            working=small,
            cam_scale=self.classifier.cam_scale,
        )

    def _classify_cells(
        self, field: np.ndarray, cutting: list[Future], um: float | None, single_cell: bool, timings: dict
    ) -> list[tuple[finder.FoundCell, CellPrediction, np.ndarray, Future]]:
        """(cell, prediction, crop, its pictures being made) for each cut cell, in order.

        CLASSIFY_BATCH cells at a time: wait for their cuts, crop them, classify them, and start each one's
        overlay, hash and heatmap JPEG in a worker thread, beside the model's next crop. The interpreter's
        threads leave the cores idle at times; this work fills them instead of following the last crop.
        The find, crop and classify stages' times are added to `timings`.
        """
        cam_scale = self.classifier.cam_scale
        cells: list[tuple[finder.FoundCell, CellPrediction, np.ndarray, Future]] = []
        timings["crop"] = timings["classify"] = 0.0
        try:
            for start in range(0, len(cutting), CLASSIFY_BATCH):
                t = time.perf_counter()
                batch = [f.result() for f in cutting[start : start + CLASSIFY_BATCH]]
                _add_ms(timings, "find", t)
                t = time.perf_counter()
                if single_cell:
                    # An uploaded cell goes through exactly the training path (prepare_cell, no margin): training
                    # images are used as they are, so an upload of the same file gives the model the same input.
                    crops = [prepare_cell(field, self.contract)]
                else:
                    crops = [crop_cell(field, c.box, c.mask, self.contract, um_per_px=um) for c in batch]
                _add_ms(timings, "crop", t)
                t = time.perf_counter()
                preds = self.classifier.classify(np.stack(crops), batch_size=CLASSIFY_BATCH)
                _add_ms(timings, "classify", t)
                for c, p, crop in zip(batch, preds, crops, strict=True):
                    cells.append((c, p, crop, _CELL_WORK.submit(_pictures, crop, p.cam, cam_scale)))
        except BaseException:
            for f in (*cutting, *(c[3] for c in cells)):
                f.cancel()  # the cells' work not yet started is dropped
            raise
        return cells

    def _quality(self, image: np.ndarray, single_cell: bool) -> tuple[QualityReport, float]:
        """(focus and exposure report, milliseconds). `image` is the working copy on a calibrated rig
        (sharpness is then measured at a fixed scale in µm, as `leukocam calibrate-qc` measures it)."""
        t = time.perf_counter()
        qc = assess(image, self.config.quality.min_focus, self.config.quality.max_clipped_fraction)
        if single_cell:
            qc = QualityReport(
                qc.focus, qc.clipped_fraction, qc.mean_brightness, ()
            )  # single crops are judged by the model only
        return qc, _ms(t)

    @property
    def default_um(self) -> float:
        return finder.FinderParams().default_um_per_px

    def _pixel_size(self, field: np.ndarray, single_cell: bool, notes: list) -> tuple[float | None, bool]:
        """(µm per pixel or None, whether the cells must go to review because the scale is unknown).

        The calibrated value is used as it is, with a cheap check against the
        red cells that warns when they disagree (another objective). Without a
        calibration the red cells are measured on every field (slow on 12 MP)
        and, when they cannot tell, the pixel size is unknown: a bundle that
        crops a fixed field of view in micrometres then cannot crop at the
        trained scale, so its cells are marked for review, never silently rescaled.
        """
        calibrated = self.config.finder.um_per_px or None
        if single_cell:
            return calibrated, False
        if calibrated is not None:
            return calibrated, False  # checked against the red cells beside the finder (see analyse)
        um = finder.estimate_um_per_px(field)
        if um is not None:
            notes.append("pixel size measured on this field (not calibrated: run `leukocam calibrate`)")
            return um, False
        if self.contract.crop_um is not None:
            notes.append(
                "pixel size unknown (not calibrated, and the red cells cannot tell): cells were not cropped "
                "at the model's scale and are marked for review; run `leukocam calibrate`"
            )
            return None, True
        return None, False


def _refused(message: str) -> FieldAnalysis:
    """The analysis of an input that is no image at all: a verdict, no cells."""
    return FieldAnalysis("retake", message, QualityReport(0.0, 0.0, 0.0, (message,)), (), 0, None, {}, 0, 0)


def to_record(
    analysis: FieldAnalysis,
    *,
    slide_id: str,
    source: str,
    trigger: str,
    model_sha256: str,
    model_synthetic: bool,
    camera: dict | None = None,
    extra_timings: dict | None = None,
) -> CaptureRecord:
    """Package an analysis for `Store.save_capture` (the cells' heatmaps were encoded by `Analyzer.analyse`).

    The record carries neither the field JPEG nor the cells' crop PNGs, the two archival copies: the
    caller stores the result first and attaches them when they are encoded (`encode_crops` and
    `Store.attach_cell_crops`, `encode_field` and `Store.attach_field_image`), so that encoding them
    never holds the result back.
    """
    cells = tuple(_cell_record(c) for c in analysis.cells)
    timings = dict(extra_timings or {}, **analysis.timings_ms)
    qc = analysis.quality.to_dict()
    qc["skipped_cells"] = analysis.skipped
    return CaptureRecord(
        slide_id=slide_id,
        source=source,
        trigger=trigger,
        status=analysis.status,
        message=analysis.message,
        width=analysis.width,
        height=analysis.height,
        um_per_px=analysis.um_per_px,
        model_sha256=model_sha256,
        model_synthetic=model_synthetic,
        field_jpeg=None,
        qc=qc,
        timings=timings,
        camera=camera or {},
        cells=cells,
        cam_scale=analysis.cam_scale,
    )


def _cell_record(c: ClassifiedCell) -> CellRecord:
    """One classified cell as it is stored."""
    return CellRecord(
        box=c.box,
        probability=c.probability,
        logit=c.logit,
        label=c.label,
        positive=c.positive,
        needs_review=c.needs_review,
        crop_png=None,  # encoded and attached after the result (`encode_crops`, `Store.attach_cell_crops`)
        heatmap_jpeg=c.heatmap_jpeg or encode_heatmap(c.heatmap),  # a cell built outside `analyse` is encoded here
        dhash=c.dhash,
        crop_nbytes=c.crop.nbytes,
    )


def _pictures(crop: np.ndarray, cam: np.ndarray, cam_scale: float) -> tuple[np.ndarray, int | None, bytes]:
    """A cell's heatmap overlay, the crop's hash, and the overlay encoded as it is stored (the crop's lossless
    PNG, an archival copy, is encoded after the result: `encode_crops`)."""
    heatmap = evidence_overlay(crop, cam, cam_scale)
    return heatmap, crop_dhash(crop), encode_heatmap(heatmap)


def encode_crops(analysis: FieldAnalysis) -> list[bytes]:
    """The cells' crop PNGs, in order, for `Store.attach_cell_crops` after the result is stored."""
    return [encode_crop_png(c.crop) for c in analysis.cells]


def png_fast_options(cv=cv2) -> tuple[int, ...]:
    """imencode options for `encode_crop_png`. The strategy must follow the compression level (setting the level
    resets it). The per-row filter option is OpenCV 4.12's; older OpenCV (the `device` extra allows 4.9) keeps
    libpng's trial of every filter: the same pixels, slower."""
    options = (cv.IMWRITE_PNG_COMPRESSION, 1, cv.IMWRITE_PNG_STRATEGY, cv.IMWRITE_PNG_STRATEGY_RLE)
    if hasattr(cv, "IMWRITE_PNG_FILTER") and hasattr(cv, "IMWRITE_PNG_FILTER_UP"):
        options += (cv.IMWRITE_PNG_FILTER, cv.IMWRITE_PNG_FILTER_UP)
    return options


_PNG_FAST = png_fast_options()


def encode_crop_png(crop: np.ndarray) -> bytes:
    """A cell crop as lossless PNG, fast: zlib level 1 with run-length matching only (cells sit on black) and one
    filter (Up) for every row instead of libpng's trial of all five per row. On the 300 px crops of a 12 MP field,
    per crop: 2.4 ms and 58 kB, against 3.3 ms and 49 kB with the Paeth filter and 5.3 ms and 49 kB for Pillow's
    level 1 (the capture's field JPEG is megabytes)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(check_rgb(crop, "crop"), cv2.COLOR_RGB2BGR), _PNG_FAST)
    if not ok:
        raise ImageError("OpenCV could not encode a cell crop as PNG")
    return buf.tobytes()


def encode_heatmap(heatmap: np.ndarray) -> bytes:
    """A cell's heatmap overlay as it is stored (a picture for people: JPEG)."""
    return encode_image(heatmap, "JPEG", quality=HEATMAP_JPEG_QUALITY)


def encode_field(field: np.ndarray) -> bytes:
    """The archival field JPEG."""
    return encode_image(field, "JPEG", quality=FIELD_JPEG_QUALITY)


def _done(value) -> Future:
    """A future that already holds value."""
    f: Future = Future()
    f.set_result(value)
    return f


def _add_ms(timings: dict[str, float], stage: str, t0: float) -> None:
    """Add the milliseconds since t0 to a stage's timing (a stage that runs once per cell)."""
    timings[stage] = timings.get(stage, 0.0) + _ms(t0)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
