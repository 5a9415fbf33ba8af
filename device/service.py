"""The appliance: one process that owns the camera, the classifier and the store.

A single worker thread takes capture requests from a queue of one, so there
are never two overlapping captures: a press while busy is refused with a
message. The dashboard and the button only enqueue. Camera errors are retried,
then shown in the health report; they never stop the service.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from device.bundle import Bundle
from device.bundle_store import resolve_active_bundle
from device.camera import Camera, build_camera
from device.cells import check_scale
from device.classifier import SelfTestResult
from device.config import Config
from device.errors import BusyError, CameraError, ImageError, InputError, LeukoCamError, NotFoundError
from device.imaging import decode_image
from device.pipeline import Analyzer, FieldAnalysis, encode_crops, encode_field, to_record
from device.store import ReconcileReport, Store
from device.trigger import Trigger

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_big_buffers_to_the_os(threshold: int = 4 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mmap, freed straight back to the OS.

    A 12 MP frame is 37 MB and a capture makes a few short-lived copies of it. glibc's default raises its
    mmap threshold after the first large free, after which such buffers come from the heap and stay
    resident: the appliance's peak memory then grows by tens of MB per capture pattern. Measured with a
    300 px int8 bundle, a 1 MB threshold against glibc's default: steady RSS 221 -> 169 MB, peak 337 -> 289
    MB. glibc only; elsewhere a no-op.
    The price is a page fault per 4 kB on first touch of each fresh buffer. At 4 MB the finder's buffers
    (a 0.4 um/px working copy of a 12 MP frame is 2.3 MB, its float planes 3 MB) and the cells' 1 MB
    float planes stay on the heap: in the pipeline benchmark the 12 MP find took 63-67 ms instead of
    76-77 at a 1 MB threshold, with the same peak RSS (237-239 MB; steady RSS was not measured again). A
    16 MB threshold, which also keeps
    the quarter-frame copies on the heap, measured a peak of 331 MB against 273 MB (an older pipeline).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


SLIDE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
"""Slide IDs are file and URL safe, and never start with a dot ("." and ".." are path names, not IDs)."""
UPLOADS_SLIDE = "uploads"
"""Where uploads go unless the user adds them to the current slide: they never change a slide's count unasked."""
STARTUP_SLIDE = "demo-startup"
"""Where the start-up captures go ([service] startup_captures, trigger "startup"): they show that camera, model and
store work, and are no sample of the smear on the stage, so they never count in the current slide. As every start
captures the same fields again, their repeats are found and counted once there (device.store.duplicates)."""
CELL_MAX_PIXELS = 4_000_000
"""A single-cell upload is a crop (C-NMC cells are 450 px; a cell at 0.05 um/px is about 400 px)."""
CELL_MAX_ASPECT = 3.0
FIELD_MAX_ASPECT = 4.0
"""Camera frames are 4:3 to 16:9; anything thinner is no field (and pads to a huge square as one cell)."""
UPLOAD_WAIT_S = 60.0


@dataclass(frozen=True)
class CaptureOutcome:
    capture_id: int | None
    status: str
    message: str


@dataclass
class Archival:
    """The archival copies of one stored result, written on the encoder thread right after it."""

    capture_id: int
    crops_done: threading.Event = field(default_factory=threading.Event)
    """Set when the cells' crop PNGs are written (or their failure reported)."""
    field_done: threading.Event = field(default_factory=threading.Event)
    """Set when the field JPEG is written (or its failure reported)."""


class Appliance:
    """Builds every long-lived part once. Use as a context manager; `start()` runs the worker."""

    def __init__(self, config: Config, camera: Camera | None = None):
        return_big_buffers_to_the_os()
        self.config = config
        self.started_at = time.time()
        self.store = Store(config.store.data_dir, config.store.min_free_mb)
        self.reconcile: ReconcileReport = self.store.reconcile()
        # A bundle store rolls back to `previous` here when `current` fails its checks (device/bundle_store.py).
        active = resolve_active_bundle(
            config.bundle_path, threads=config.model.threads, self_test=config.model.self_test
        )
        self.bundle: Bundle = active.bundle
        self.classifier = active.classifier
        self.self_test: SelfTestResult | None = active.self_test
        self.bundle_rolled_back: bool = active.rolled_back
        self.bundle_note: str = active.note
        self.analyzer = Analyzer(self.classifier, config)
        self.camera: Camera = camera if camera is not None else build_camera(config)
        # Until the operator starts a new slide, captures go to the configured slide or one per day.
        self.slide_id = self.new_slide(config.service.slide_id or f"slide-{datetime.now():%Y%m%d}")
        self._queue: queue.Queue[str] = queue.Queue(maxsize=1)
        self._work_lock = threading.Lock()  # uploads and captures share the CPU-heavy path
        self._upload_slot = threading.Semaphore(1)  # and one upload at a time is decoded (memory)
        # The archival copies (the cells' crop PNGs, the field JPEG) are encoded after the result is stored
        # (OpenCV and PIL release the GIL while they encode), so they never hold the result back; stop()
        # waits for them.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukocam-encode")
        self._archiving: Future | None = None
        self.archival: Archival | None = None
        """The last stored result's archival copies (see `wait_for_image`)."""
        self.scale_warning: str | None = None
        """The last disagreement between the red cells and the calibrated pixel size, for the status page."""
        self._busy = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_outcome: CaptureOutcome | None = None
        self.last_error: str | None = None
        self.captures_done = 0
        self.retention: dict | None = None
        self.trigger: Trigger | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.trigger.enabled:
            # Fails start-up on purpose when the config asks for a button that is not there.
            self.trigger = Trigger(self.config.trigger, self._button_pressed, self._button_held)
        self._thread = threading.Thread(target=self._run, name="capture-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.trigger is not None:  # no new presses while shutting down
            self.trigger.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.camera.close()
        self.classifier.close()
        self._encoder.shutdown(wait=True)
        self.store.close()

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- slides ------------------------------------------------------------------------------
    def new_slide(self, slide_id: str | None = None) -> str:
        """Start a new slide (dashboard ID or a long press); later captures belong to it."""
        slide_id = (slide_id or f"slide-{datetime.now():%Y%m%d-%H%M%S}").strip()
        if not SLIDE_ID.fullmatch(slide_id):
            raise InputError(f"slide ID {slide_id!r}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'")
        self.store.ensure_slide(slide_id)
        self.slide_id = slide_id
        log.info("slide %s", slide_id)
        return slide_id

    @property
    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._busy.is_set() or not self._queue.empty()

    def request_capture(self, trigger: str = "web") -> None:
        """Queue one capture. Raises BusyError when one is already running or waiting."""
        if self.busy:
            raise BusyError("a capture is already in progress; wait for its result, then press again")
        try:
            self._queue.put_nowait(trigger)
        except queue.Full:
            raise BusyError("a capture is already in progress; wait for its result, then press again") from None

    def capture_now(self, trigger: str = "cli") -> CaptureOutcome:
        """Capture and analyse synchronously in the caller's thread (the CLI's one-shot capture)."""
        return self._capture(trigger)

    def analyse_upload(self, data, name: str, single_cell: bool = False, add_to_slide: bool = False) -> CaptureOutcome:
        """Decode an uploaded image (bytes or an open file) and analyse it like a capture.

        One upload is decoded and analysed at a time (`UPLOAD_WAIT_S` in the queue at most, then
        BusyError), and its size and shape are checked from the header first, so hostile files cannot
        add up to more memory than one frame. The result goes to the current slide only when
        `add_to_slide`; otherwise to the `UPLOADS_SLIDE`, so a stray file never moves a slide's count.

        Raises:
            ImageError: unreadable, too large or too thin files. BusyError: the queue did not move.
        """
        max_pixels = self.config.store.max_image_pixels
        if single_cell:
            limits = (min(max_pixels, CELL_MAX_PIXELS), CELL_MAX_ASPECT, "crop the image to the one cell")
        else:
            limits = (max_pixels, FIELD_MAX_ASPECT, "use a smaller image or raise store.max_image_pixels")
        if not self._upload_slot.acquire(timeout=UPLOAD_WAIT_S):
            raise BusyError("another upload is being analysed; try again in a minute")
        try:
            if not add_to_slide:
                self.store.ensure_slide(UPLOADS_SLIDE)
            self.wait_archived()  # the last field's archival copy first: never two big frames at once
            try:
                image = decode_image(data, max_pixels=limits[0], max_aspect=limits[1], too_big_hint=limits[2])
            except ImageError as exc:
                raise ImageError(f"{name}: {exc}") from None  # the operator sees which file
            return self._analyse_and_store(
                image,
                source=name,
                trigger="upload",
                camera={"backend": "upload"},
                single_cell=single_cell,
                decode_ms=None,
                slide_id=self.slide_id if add_to_slide else UPLOADS_SLIDE,
            )
        finally:
            self._upload_slot.release()

    # -- the worker --------------------------------------------------------------------------
    def _run(self) -> None:
        # Start-up captures run here, not in start(), so the dashboard is up while they work.
        pending = ["startup"] * self.config.service.startup_captures
        while not self._stop.is_set():
            if pending:
                trigger = pending.pop()
            else:
                try:
                    trigger = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            self._busy.set()
            self._feedback("busy")
            try:
                outcome = self._capture(trigger)
                state = {"ok": "done", "retake": "retake"}.get(outcome.status, "error")
                if state == "done" and trigger != "startup" and self.count_decided():
                    state = "decided"  # the LED tells the operator at the eyepiece that the count is complete
                self._feedback(state)
            except Exception as exc:  # the worker must survive anything a capture throws
                log.exception("capture failed")
                self.last_error = f"capture failed: {exc}"
                self._feedback("error")
            finally:
                self._busy.clear()

    def count_decided(self, slide_id: str | None = None) -> bool:
        """True when the slide's guided count is complete: [slides] target_cells reached and the 95% CI of
        the blast fraction wholly above or below decision_threshold (see device.stats.count_decision)."""
        from device.stats import count_decision

        cells = self.store.slide_cells(slide_id or self.slide_id)
        blasts = sum(c["verdict"] == "blast" for c in cells)
        cfg = self.config.slides
        return count_decision(len(cells), blasts, cfg.target_cells, cfg.decision_threshold)["decision"] != "keep"

    # -- the button (these run on the Trigger's own worker thread) -----------------------------
    def _feedback(self, state: str) -> None:
        if self.trigger is not None:
            self.trigger.set_state(state)

    def _button_pressed(self) -> None:
        try:
            self.request_capture("button")
        except BusyError:
            self._feedback("refused")

    def _button_held(self) -> None:
        if self.busy:  # don't move a capture that is still running to a new slide
            self._feedback("refused")
            return
        self.new_slide()
        self._feedback("done")

    def _capture(self, trigger: str) -> CaptureOutcome:
        retries = self.config.camera.retries
        frame = None
        t0 = time.perf_counter()
        for attempt in range(retries + 1):
            try:
                frame = self.camera.capture()
                break
            except CameraError as exc:
                self.last_error = f"camera error (attempt {attempt + 1} of {retries + 1}): {exc}"
                log.warning(self.last_error)
                if attempt < retries:
                    time.sleep(min(0.2 * 2**attempt, 2.0))
        if frame is None:
            outcome = CaptureOutcome(None, "error", self.last_error or "camera failed")
            self.last_outcome = outcome
            return outcome
        decode_ms = round((time.perf_counter() - t0) * 1000, 2)
        return self._analyse_and_store(
            frame.image,
            source=frame.source,
            trigger=trigger,
            camera=frame.metadata,
            single_cell=False,
            decode_ms=decode_ms,
            slide_id=STARTUP_SLIDE if trigger == "startup" else None,
        )

    def _analyse_and_store(
        self, image, *, source, trigger, camera, single_cell, decode_ms, slide_id: str | None = None
    ) -> CaptureOutcome:
        with self._work_lock:
            try:
                self.store.check_space()
                analysis = self.analyzer.analyse(image, single_cell=single_cell)
                extra = {"capture": decode_ms} if decode_ms is not None else {}
                record = to_record(
                    analysis,
                    slide_id=slide_id or self.slide_id,
                    source=source,
                    trigger=trigger,
                    model_sha256=self.bundle.sha256,
                    model_synthetic=self.bundle.synthetic,
                    camera=camera,
                    extra_timings=extra,
                )
                capture_id = self.store.save_capture(record)  # records its own "store" time
                if analysis.status == "ok":
                    self.last_error = None  # before the archive below can report a failure of its own
                # The result is stored; the archival copies (the cells' crop PNGs, the 12 MP field JPEG) and
                # the scale check follow in the background.
                calibrated = self.config.finder.um_per_px or None
                check = calibrated is not None and self.config.finder.scale_check and analysis.status == "ok"
                pending = Archival(capture_id)
                self.archival = pending
                self._archiving = self._encoder.submit(
                    self._after_result, pending, image, analysis, analysis.working if check else None, calibrated
                )
                if self.config.store.max_images_mb:
                    self.retention = self.store.apply_retention(self.config.store.max_images_mb)
                log.info("capture %d (%s): %s", capture_id, trigger, analysis.message)
            except (LeukoCamError, ImageError) as exc:
                self.last_error = str(exc)
                outcome = CaptureOutcome(None, "error", str(exc))
                self.last_outcome = outcome
                if trigger == "upload":
                    raise
                return outcome
        self.captures_done += 1
        outcome = CaptureOutcome(capture_id, analysis.status, analysis.message)
        self.last_outcome = outcome
        return outcome

    def _after_result(
        self, pending: Archival, image, analysis: FieldAnalysis, working, calibrated: float | None
    ) -> None:
        """What follows a stored result, on the encoder thread: the archival copies (the cells' lossless crop
        PNGs, then the field JPEG), then (given the analysis' working copy) the cheap check of the calibrated
        pixel size against the red cells. It never raises: a failure is logged and shown on the status page."""
        capture_id = pending.capture_id
        t = time.perf_counter()
        crops_saved = self._archive(
            capture_id, "cell crops", lambda: self.store.attach_cell_crops(capture_id, encode_crops(analysis))
        )
        pending.crops_done.set()
        field_saved = self._archive(
            capture_id, "field image", lambda: self.store.attach_field_image(capture_id, encode_field(image))
        )
        pending.field_done.set()
        if crops_saved and field_saved:
            ms = (time.perf_counter() - t) * 1000
            self._archive(capture_id, "archive time", lambda: self.store.add_timing(capture_id, "archive", ms))
        if working is not None and calibrated is not None:
            self._archive(
                capture_id, "scale check result", lambda: self._check_scale(capture_id, image, working, calibrated)
            )

    def _check_scale(self, capture_id: int, image, working, calibrated: float) -> None:
        """Warn when the red cells disagree with the calibrated pixel size (another objective?)."""
        t = time.perf_counter()
        warning = check_scale(working, calibrated, factor=working.shape[1] / image.shape[1])
        self.store.add_timing(capture_id, "scale_check", (time.perf_counter() - t) * 1000)
        if warning:
            log.warning("capture %d: %s", capture_id, warning)
            self.scale_warning = f"capture {capture_id}: {warning}"
            self.store.add_note(capture_id, warning)

    def _archive(self, capture_id: int, what: str, step) -> bool:
        """Run one step that follows a stored result; on a failure, log it and show it on the status page.

        A capture deleted meanwhile (retention, an operator) is no failure: its copies are simply not wanted.
        Any other error is caught too: this runs on the encoder thread, and the next capture must not fail
        because a copy of the last one could not be written.
        """
        try:
            step()
            return True
        except NotFoundError:
            log.info("capture %d was deleted before its %s: nothing to do", capture_id, what)
            return False
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            self.last_error = f"capture {capture_id}: {what} not saved: {exc}"
            log.error(self.last_error, exc_info=not isinstance(exc, (LeukoCamError, OSError)))
            return False

    def wait_archived(self, timeout: float | None = None) -> None:
        """Block until everything that follows the last stored result is done: its crop PNGs and field JPEG on
        disk (or their failure reported), and the scale check (tests, benchmarks, uploads, shutdown)."""
        if self._archiving is not None:
            self._archiving.result(timeout)

    def wait_for_image(self, kind: str, timeout: float) -> None:
        """Give an archival image of the last result ("crop" or "field") up to `timeout` seconds to be written.

        The dashboard asks for a capture's images as soon as its result is stored; the crop PNGs and the
        field JPEG follow a moment later. Returns at once when no archive is being written. Never raises.
        """
        pending = self.archival
        if pending is not None:
            (pending.crops_done if kind == "crop" else pending.field_done).wait(timeout)

    # -- status ------------------------------------------------------------------------------
    def is_ok(self) -> bool:
        """Liveness: the capture worker runs and the model passed its self-test."""
        return self.worker_alive and (self.self_test is None or self.self_test.passed)

    def health(self) -> dict:
        worker_alive = self.worker_alive
        return {
            "ok": self.is_ok(),
            "worker_alive": worker_alive,
            "busy": self.busy,
            "uptime_s": round(time.time() - self.started_at, 1),
            "captures_done": self.captures_done,
            "last_error": self.last_error,
            "scale_warning": self.scale_warning,
            "last_outcome": None if self.last_outcome is None else self.last_outcome.__dict__,
            "camera": self.camera.name,
            "slide_id": self.slide_id,
            "slide": self.store.slide_summary(self.slide_id),
            "runtime": self.classifier.runtime,
            "model": {
                "path": str(self.bundle.path),
                "sha256": self.bundle.sha256,
                "name": self.bundle.info.name,
                "synthetic": self.bundle.synthetic,
                "threshold": self.bundle.threshold,
                "review_band": list(self.bundle.review_band),
                "input_size": self.bundle.info.input_size,
                "quantization": self.bundle.info.quantization.mode,
                "rolled_back": self.bundle_rolled_back,
                "note": self.bundle_note,
            },
            "self_test": None if self.self_test is None else self.self_test.message,
            "store": {
                "captures": self.store.count_captures(),
                "free_mb": round(self.store.free_mb()),
                "reconcile": self.reconcile.summary(),
                "retention": self.retention,
            },
        }
