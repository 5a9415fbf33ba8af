"""A working fake of the picamera2 subset LeukoCam uses, for tests off a Pi.

Only tests put this folder on sys.path (monkeypatch.syspath_prepend). It mirrors
the real library's behaviour where LeukoCam depends on it (checked against
raspberrypi/picamera2, picamera2/picamera2.py):

- `create_preview_configuration` / `create_still_configuration` return plain
  dicts with "main" {"size", "format"} and "controls"; `configure` replaces the
  current controls with the configuration's (a mode switch does too).
- Arrays come back in the real memory order: "RGB888" is B,G,R; "BGR888" is
  R,G,B; the X...8888 formats carry a fourth byte.
- Frames carry SensorTimestamp (ns, time.monotonic_ns clock, end of exposure)
  and ExposureTime (us). `capture_request(flush=True | ns)` drops queued frames
  that began exposing before that time (the real `wait_for_timestamp_`);
  without flush the oldest queued frame comes back, stale or not.
- AE/AWB: while enabled, exposure, gain and colour gains wander for a few frames
  and then settle; set values are reported exactly. How AE reports it follows the
  libcamera the fake stands for (LIBCAMERA_VERSION):
  - libcamera >= 0.5.0 (commit a533bd00 "controls: Remove AeLocked"): metadata
    carries `AeState` (AeStateEnum: 0 Idle, 1 Searching, 2 Converged; Idle when
    both ExposureTimeMode and AnalogueGainMode are Manual) and the two mode
    controls; `ExposureTimeMode` / `AnalogueGainMode` are advertised, and an
    ExposureTime / AnalogueGain set while its mode is Auto is ignored and not
    retained, as libcamera's control_ids_core.yaml says. AeEnable False is the
    convenience that sets both modes to Manual.
  - older libcamera: metadata carries the boolean `AeLocked`, no mode controls
    exist, and a set ExposureTime / AnalogueGain takes effect directly.
- `wait`: picamera2 takes a timeout in seconds from 0.3.20 (VERSION); before
  that `wait` is only tested for truth, so a number means "block without a
  limit". Each call's wait is logged in `waits` as (value, honoured as seconds).

Test knobs (module attributes, reset by re-importing the module): SENSOR_RESOLUTION,
SCENE (an RGB uint8 image, default the first shipped demo field), NO_CAMERA,
STALE_FRAMES_ON_START, VERSION, LIBCAMERA_VERSION. Per camera: `queue_stale_frames(n)`,
`ignore_flush`, `unplug()`, `controls_log`, `calls`, `waits`, `instances`.

firmware_config/pi-check.sh packages this file as apt's python3-picamera2 (version
VERSION) for the emulated Raspberry Pi OS, where the real one cannot be installed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

SENSOR_RESOLUTION = (1014, 760)
"""Small for fast tests (the HQ camera's 2x2 binned mode); tests may change it."""
SCENE: np.ndarray | None = None
"""RGB uint8 scene the sensor sees; None = device/demo/fields/field_0000.jpg."""
NO_CAMERA = False
"""True: Picamera2() fails the way the real one does with no camera attached."""
STALE_FRAMES_ON_START = 0
"""Frames exposed before start() that are queued when the camera starts (pipeline latency)."""

VERSION = "0.3.30"
"""The picamera2 release this fake stands for (capture_request(wait=<seconds>) needs >= 0.3.20)."""
LIBCAMERA_VERSION = (0, 5, 0)
"""The libcamera this fake stands for: >= (0, 5, 0) reports AeState, older reports AeLocked."""
TIMEOUT_WAIT_FROM = (0, 3, 20)
"""First picamera2 release whose `wait` argument is a timeout in seconds."""
AE_STATE_IDLE, AE_STATE_SEARCHING, AE_STATE_CONVERGED = 0, 1, 2
"""libcamera controls::AeStateEnum."""
MODE_AUTO, MODE_MANUAL = 0, 1
"""libcamera ExposureTimeModeEnum / AnalogueGainModeEnum."""

FRAME_NS = 33_333_333
AUTO_EXPOSURE_US = 12_000
AUTO_GAIN = 2.0
AUTO_COLOUR_GAINS = (2.1, 1.7)
SETTLE_FRAMES = 6

instances: list[Picamera2] = []


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _new_libcamera() -> bool:
    return tuple(LIBCAMERA_VERSION) >= (0, 5, 0)


def _field() -> Path:
    """The first shipped demo field: beside the checkout, else inside the installed `device` package."""
    here = Path(__file__).resolve().parents[3] / "device" / "demo" / "fields" / "field_0000.jpg"
    if here.is_file():
        return here
    import importlib.util

    spec = importlib.util.find_spec("device")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fake picamera2: no scene (set SCENE, or install leukocam beside it)")
    return Path(list(spec.submodule_search_locations)[0]) / "demo" / "fields" / "field_0000.jpg"


def _scene() -> np.ndarray:
    if SCENE is not None:
        return np.asarray(SCENE, dtype=np.uint8)
    with Image.open(_field()) as im:
        return np.asarray(im.convert("RGB"))


def _in_memory_order(rgb: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "RGB888":
        return np.ascontiguousarray(rgb[..., ::-1])
    if fmt == "BGR888":
        return np.ascontiguousarray(rgb)
    pad = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    if fmt == "XRGB8888":
        return np.ascontiguousarray(np.concatenate([rgb[..., ::-1], pad], axis=2))
    if fmt == "XBGR8888":
        return np.ascontiguousarray(np.concatenate([rgb, pad], axis=2))
    raise RuntimeError(f"fake picamera2: make_array of {fmt} is not simulated")


class CompletedRequest:
    """One finished frame: pixels of every stream plus metadata; release() returns it."""

    def __init__(self, camera: Picamera2, metadata: dict):
        self._camera = camera
        self._metadata = metadata
        self.released = False

    def make_array(self, name: str = "main") -> np.ndarray:
        if self.released:
            raise RuntimeError("fake picamera2: request used after release()")
        stream = self._camera.camera_config[name]
        width, height = stream["size"]
        rgb = np.asarray(Image.fromarray(_scene()).resize((width, height), Image.BILINEAR))
        return _in_memory_order(rgb, stream["format"])

    def get_metadata(self) -> dict:
        return dict(self._metadata)

    def release(self) -> None:
        self.released = True


class Picamera2:
    def __init__(self, camera_num: int = 0, tuning=None):
        if NO_CAMERA:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        self.camera_num = camera_num
        self.sensor_resolution = tuple(SENSOR_RESOLUTION)
        self.camera_controls = {
            "AeEnable": (False, True, True),
            "AwbEnable": (False, True, True),
            "ExposureTime": (1, 66_666_666, 20_000),
            "AnalogueGain": (1.0, 22.26, 1.0),
            "ColourGains": (0.0, 32.0, None),
        }
        if _new_libcamera():
            self.camera_controls["ExposureTimeMode"] = (MODE_AUTO, MODE_MANUAL, MODE_AUTO)
            self.camera_controls["AnalogueGainMode"] = (MODE_AUTO, MODE_MANUAL, MODE_AUTO)
        self.waits: list[tuple[object, bool]] = []
        self.camera_config: dict | None = None
        self.controls: dict = {}
        self.controls_log: list[dict] = []
        self.calls: list[str] = []
        self.started = False
        self.is_open = True
        self.ignore_flush = False
        self.unplugged = False
        self._queue: list[CompletedRequest] = []
        self._auto_frames = 0
        instances.append(self)

    # configuration ------------------------------------------------------------
    def _make_config(self, kind: str, main: dict, controls: dict, size, fmt, buffer_count: int) -> dict:
        stream = {"format": fmt, "size": size, "preserve_ar": True} | dict(main or {})
        stream["size"] = tuple(stream["size"])
        if stream["size"][0] % 2 or stream["size"][1] % 2:
            raise RuntimeError("width and height should be even")
        return {
            "use_case": kind,
            "buffer_count": buffer_count,
            "main": stream,
            "lores": None,
            "raw": {"size": stream["size"]},
            "controls": dict(controls or {}),
        }

    def create_preview_configuration(self, main=None, lores=None, raw=None, buffer_count=4, controls=None, **_):
        return self._make_config("preview", main, controls, (640, 480), "XBGR8888", buffer_count)

    def create_still_configuration(self, main=None, lores=None, raw=None, buffer_count=1, controls=None, **_):
        return self._make_config("still", main, controls, self.sensor_resolution, "BGR888", buffer_count)

    def configure(self, camera_config: dict) -> None:
        self._check_open()
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        self.calls.append(f"configure:{camera_config['use_case']}")
        self.camera_config = camera_config
        # Like the real configure_(): the configuration's controls replace the current ones.
        self.controls = {}
        self._apply(dict(camera_config.get("controls") or {}))
        self._auto_frames = 0

    def start(self) -> None:
        self._check_open()
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        self.calls.append("start")
        self.started = True
        self._queue = []
        if STALE_FRAMES_ON_START:
            self.queue_stale_frames(STALE_FRAMES_ON_START)

    def stop(self) -> None:
        self.calls.append("stop")
        self.started = False
        self._queue = []  # the real stop_() releases the completed requests

    def close(self) -> None:
        if self.started:
            self.stop()
        self.calls.append("close")
        self.is_open = False

    def switch_mode(self, camera_config: dict, wait=None, signal_function=None) -> dict:
        self._check_live()
        self.stop()
        self.configure(camera_config)
        self.start()
        return self.camera_config

    def set_controls(self, controls: dict) -> None:
        self._check_open()
        unknown = set(controls) - set(self.camera_controls)
        if unknown:
            raise RuntimeError(f"Control {sorted(unknown)[0]} is not advertised by libcamera")
        self.controls_log.append(dict(controls))
        self._apply(controls)

    def _apply(self, controls: dict) -> None:
        """Merge controls as libcamera does: from 0.5, a value set while its mode is Auto is dropped."""
        self.controls.update(controls)
        if not _new_libcamera():
            return
        if controls.get("AeEnable") is False:  # the convenience: both modes Manual
            self.controls.setdefault("ExposureTimeMode", MODE_MANUAL)
            self.controls.setdefault("AnalogueGainMode", MODE_MANUAL)
        elif controls.get("AeEnable") is True:
            self.controls.update(ExposureTimeMode=MODE_AUTO, AnalogueGainMode=MODE_AUTO)
        for value, mode in (("ExposureTime", "ExposureTimeMode"), ("AnalogueGain", "AnalogueGainMode")):
            if value in controls and self.controls.get(mode, MODE_AUTO) != MODE_MANUAL:
                del self.controls[value]  # "ignored, and its value will not be retained"

    def _manual(self) -> tuple[bool, bool]:
        """(exposure time fixed, analogue gain fixed) under the current controls."""
        c = self.controls
        if _new_libcamera():
            return c.get("ExposureTimeMode") == MODE_MANUAL, c.get("AnalogueGainMode") == MODE_MANUAL
        ae_off = c.get("AeEnable", True) is False
        return ae_off or "ExposureTime" in c, ae_off or "AnalogueGain" in c

    # frames -------------------------------------------------------------------
    def unplug(self) -> None:
        """Simulate a pulled ribbon cable: every later frame request raises RuntimeError."""
        self.unplugged = True

    def queue_stale_frames(self, count: int) -> None:
        """Queue `count` frames whose exposure began before now (frames buffered before a press)."""
        now = time.monotonic_ns()
        for k in range(count, 0, -1):
            end = now - 5 * FRAME_NS - k * FRAME_NS
            self._queue.append(self._frame(end_ns=end))

    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeError("Camera is not open")

    def _check_live(self) -> None:
        self._check_open()
        if self.unplugged:
            raise RuntimeError("Device timeout detected, attempting a restart!!!")

    def _auto_values(self) -> tuple[int, float, tuple[float, float], bool]:
        progress = min(self._auto_frames, SETTLE_FRAMES) / SETTLE_FRAMES
        exposure = int(AUTO_EXPOSURE_US * (0.5 + 0.5 * progress))
        gain = AUTO_GAIN * (0.5 + 0.5 * progress)
        gains = (AUTO_COLOUR_GAINS[0] * (0.8 + 0.2 * progress), AUTO_COLOUR_GAINS[1] * (0.8 + 0.2 * progress))
        return exposure, gain, gains, self._auto_frames >= SETTLE_FRAMES

    def _frame(self, end_ns: int | None = None) -> CompletedRequest:
        exposure, gain, gains, settled = self._auto_values()
        c = self.controls
        fixed_exposure, fixed_gain = self._manual()
        if fixed_exposure:
            exposure = int(c.get("ExposureTime", exposure))
        if fixed_gain:
            gain = float(c.get("AnalogueGain", gain))
        if "ColourGains" in c:  # setting ColourGains switches AWB off in libcamera
            gains = tuple(float(g) for g in c["ColourGains"])
        if end_ns is None:
            self._auto_frames += 1
            start = time.monotonic_ns()
            end_ns = start + 1000 * exposure
        metadata = {
            "SensorTimestamp": end_ns,
            "ExposureTime": exposure,
            "AnalogueGain": gain,
            "DigitalGain": 1.0,
            "ColourGains": gains,
            "ColourTemperature": 5200,
            "Lux": 412.5,
            "FrameDuration": FRAME_NS // 1000,
            "ScalerCrop": (0, 0, *self.sensor_resolution),
            "ColourCorrectionMatrix": tuple(float(v) for v in np.eye(3).ravel()),
        }
        if _new_libcamera():
            if fixed_exposure and fixed_gain:
                metadata["AeState"] = AE_STATE_IDLE
            else:
                metadata["AeState"] = AE_STATE_CONVERGED if settled else AE_STATE_SEARCHING
            metadata["ExposureTimeMode"] = MODE_MANUAL if fixed_exposure else MODE_AUTO
            metadata["AnalogueGainMode"] = MODE_MANUAL if fixed_gain else MODE_AUTO
        else:
            metadata["AeLocked"] = bool(settled or (fixed_exposure and fixed_gain))
        return CompletedRequest(self, metadata)

    def _next(self, flush=None) -> CompletedRequest:
        self._check_live()
        if not self.started:
            raise RuntimeError("Camera is not running")
        if flush is True:
            flush = time.monotonic_ns()
        if flush and not self.ignore_flush:
            while self._queue:
                md = self._queue[0].get_metadata()
                if md["SensorTimestamp"] - 1000 * md["ExposureTime"] >= flush:
                    break
                self._queue.pop(0).release()
        if self._queue:
            return self._queue.pop(0)
        return self._frame()

    def _wait(self, wait) -> None:
        """Log how this picamera2 treats `wait`: seconds from 0.3.20, before that only its truth."""
        seconds = isinstance(wait, int | float) and not isinstance(wait, bool)
        self.waits.append((wait, seconds and _version(VERSION) >= TIMEOUT_WAIT_FROM))

    def capture_request(self, wait=None, signal_function=None, flush=None) -> CompletedRequest:
        self.calls.append(f"capture_request:flush={flush is not None and flush is not False}")
        self._wait(wait)
        return self._next(flush)

    def capture_metadata(self, wait=None, signal_function=None) -> dict:
        self.calls.append("capture_metadata")
        self._wait(wait)
        request = self._next()
        metadata = request.get_metadata()
        request.release()
        return metadata

    def capture_array(self, name: str = "main", wait=None, signal_function=None) -> np.ndarray:
        self.calls.append(f"capture_array:{name}")
        self._wait(wait)
        request = self._next()
        array = request.make_array(name)
        request.release()
        return array

    def switch_mode_and_capture_array(self, camera_config, name="main", wait=None, signal_function=None, delay=0):
        preview_config = self.camera_config
        self.switch_mode(camera_config)
        try:
            return self.capture_array(name)
        finally:
            self.switch_mode(preview_config)

    def __enter__(self) -> Picamera2:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
