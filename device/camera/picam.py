"""The Raspberry Pi camera backend: the only module that imports picamera2.

picamera2 comes from apt (python3-picamera2) and cannot be imported off a Pi, so
it is imported inside `PiCamera.__init__`; importing device.camera never needs it.

This module owns three things the rest of the device must not have to know:
- colour order: picamera2's "RGB888" is B,G,R in memory ("BGR888" is R,G,B);
  frames leave this module as RGB uint8;
- freshness: a still is taken after a mode switch, with a request flushed to the
  moment capture() was called, and its exposure start (SensorTimestamp minus
  ExposureTime) is checked against that moment, so a frame exposed before the
  button press is never returned;
- stable stain colours: exposure time, analogue gain and white balance are fixed,
  from the config where set, otherwise settled once by AE/AWB at start and then
  locked to the values the camera reported. AE has settled when libcamera says so:
  `AeState` == Converged from libcamera 0.5.0 (which removed `AeLocked`), `AeLocked`
  on older ones; each capture's metadata says how the lock was reached (`ae_lock`).

picamera2 >= 0.3.20 is needed for `wait=<seconds>` to be a timeout (before, a number
only means "wait", without a limit); install.sh and `leukocam doctor` check it.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np

from device.camera import Frame
from device.config import CameraConfig
from device.errors import CameraError

MISSING_MESSAGE = (
    "picamera2 is not installed: on Raspberry Pi OS `sudo apt install python3-picamera2` "
    "and create the venv with --system-site-packages"
)
STREAM_FORMAT = "RGB888"
"""Requested pixel format of both streams; 3 bytes a pixel, B,G,R in memory."""
SETTLE_FRAMES = 40
"""At most this many frames are given to AE/AWB to settle before the values are locked."""
MIN_SETTLE_FRAMES = 5
"""AWB has no 'converged' flag: give it at least this many frames."""
FRESH_TRIES = 8
"""Requests examined for one exposed after the press before giving up."""
TIMEOUT_S = 10.0
"""Longest wait for one frame (a long exposure on a dim field stays well below it)."""
MANUAL = 1
"""libcamera ExposureTimeModeEnum.Manual / AnalogueGainModeEnum.Manual (libcamera >= 0.5)."""
AE_STATE_CONVERGED = 2
"""libcamera AeStateEnum.Converged (AeState replaced the boolean AeLocked in libcamera 0.5.0)."""
MODE_CONTROLS = (("ExposureTime", "ExposureTimeMode"), ("AnalogueGain", "AnalogueGainMode"))
"""libcamera >= 0.5 ignores a value set while its mode is Auto: a fixed value goes with mode Manual."""
KEPT_METADATA = (
    "SensorTimestamp",
    "ExposureTime",
    "AnalogueGain",
    "DigitalGain",
    "ColourGains",
    "ColourTemperature",
    "Lux",
    "FrameDuration",
    "SensorTemperature",
    "FocusFoM",
    "ScalerCrop",
    "AeState",
    "AeLocked",
    "ExposureTimeMode",
    "AnalogueGainMode",
)

log = logging.getLogger(__name__)


class PiCamera:
    """Raspberry Pi camera (HQ, v2, v3) through picamera2; a context manager."""

    name = "picamera2"

    def __init__(self, config: CameraConfig, camera_num: int = 0):
        try:
            from picamera2 import Picamera2
        except (ImportError, ValueError) as exc:
            # ValueError: apt's simplejpeg built for numpy 1.x under the venv's numpy 2 ("dtype size changed");
            # install.sh installs a matching simplejpeg into the venv.
            raise CameraError(f"{MISSING_MESSAGE} (import failed: {exc})") from None
        self.config = config
        self.camera_num = camera_num
        self._lock = threading.Lock()
        self._cam = None
        self.ae_lock: dict = {}
        try:
            self._cam = Picamera2(camera_num)
            self.sensor_resolution = _size(self._cam.sensor_resolution)
            self.still_size = _still_size(config, self.sensor_resolution)
            self.preview_size = _preview_size(config.preview_width, self.still_size)
            fixed = self._fixed_from_config()
            self._preview_config = self._cam.create_preview_configuration(
                main={"size": self.preview_size, "format": STREAM_FORMAT}, controls=self._with_modes(fixed)
            )
            self._cam.configure(self._preview_config)
            self._cam.start()
            self.locked_controls = self._lock_controls(fixed)
            # A mode switch loads the configuration's controls: both modes carry the locked ones.
            self._preview_config["controls"].update(self.locked_controls)
            self._still_config = self._cam.create_still_configuration(
                main={"size": self.still_size, "format": STREAM_FORMAT},
                controls=dict(self.locked_controls),
            )
        except CameraError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise CameraError(
                f"picamera2: cannot start camera {camera_num} ({type(exc).__name__}: {exc}); "
                "check the ribbon cable and that the camera is detected (`rpicam-hello --list-cameras`)"
            ) from None

    def _fixed_from_config(self) -> dict:
        """Controls the config fixes; setting ColourGains also turns AWB off in libcamera."""
        fixed: dict = {}
        if self.config.exposure_us:
            fixed["ExposureTime"] = int(self.config.exposure_us)
        if self.config.analogue_gain:
            fixed["AnalogueGain"] = float(self.config.analogue_gain)
        if self.config.awb_red and self.config.awb_blue:
            fixed["ColourGains"] = (float(self.config.awb_red), float(self.config.awb_blue))
        return fixed

    def _advertised(self) -> dict:
        return dict(getattr(self._cam, "camera_controls", None) or {})

    def _with_modes(self, controls: dict) -> dict:
        """`controls` plus ExposureTimeMode / AnalogueGainMode Manual for each fixed value, where advertised."""
        out = dict(controls)
        advertised = self._advertised()
        for value, mode in MODE_CONTROLS:
            if value in out and mode in advertised:
                out[mode] = MANUAL
        return out

    def _lock_controls(self, fixed: dict) -> dict:
        """Let AE/AWB settle for what the config leaves open, then fix all three for good.

        AE has settled when the camera reports it (AeState Converged, or AeLocked on a
        libcamera older than 0.5), after at least MIN_SETTLE_FRAMES for AWB; without that
        report within SETTLE_FRAMES, the last values are locked and the capture metadata
        says so (`ae_lock`).
        """
        settled: dict = {}
        ae_needed = not ("ExposureTime" in fixed and "AnalogueGain" in fixed)
        self.ae_lock = {"ae": "config", "signal": None, "frames": 0}
        if len(fixed) < 3:
            if fixed:
                self._cam.set_controls(self._with_modes(fixed))
            converged = None
            frames = 0
            signal = None
            for frames in range(1, SETTLE_FRAMES + 1):
                settled = dict(self._cam.capture_metadata(wait=TIMEOUT_S))
                signal, converged = ae_report(settled)
                if frames >= MIN_SETTLE_FRAMES and (converged or not ae_needed):
                    break
            if not ae_needed:
                state = "config"  # exposure and gain are fixed: only AWB settled
            elif converged:
                state = "converged"
            elif signal is None:
                state = "unreported"
            else:
                state = "not converged"
            self.ae_lock = {"ae": state, "signal": signal, "frames": frames}
            if state in ("unreported", "not converged"):
                log.warning(
                    "picamera2: auto-exposure %s after %d frames; locking the last values "
                    "(set camera.exposure_us and camera.analogue_gain to fix them)",
                    "did not converge" if signal else "reported neither AeState nor AeLocked",
                    frames,
                )
        try:
            exposure = int(fixed.get("ExposureTime") or settled["ExposureTime"])
            gain = float(fixed.get("AnalogueGain") or settled["AnalogueGain"])
            red, blue = fixed.get("ColourGains") or settled["ColourGains"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CameraError(
                f"picamera2: the camera reported no {exc} after auto-exposure; set camera.exposure_us, "
                "camera.analogue_gain, camera.awb_red and camera.awb_blue to fixed values"
            ) from None
        advertised = self._advertised()
        locked: dict = {}
        if not advertised or "AeEnable" in advertised:
            locked["AeEnable"] = False
        if "ExposureTimeMode" in advertised:
            locked["ExposureTimeMode"] = MANUAL
        if "AnalogueGainMode" in advertised:
            locked["AnalogueGainMode"] = MANUAL
        locked.update(ExposureTime=exposure, AnalogueGain=gain)
        locked.update(AwbEnable=False, ColourGains=(float(red), float(blue)))
        self._cam.set_controls(dict(locked))
        return locked

    def capture(self) -> Frame:
        """Take one full-resolution still, exposed after this call started; RGB uint8."""
        with self._lock:
            cam = self._require_open()
            requested_ns = time.monotonic_ns()
            try:
                cam.switch_mode(self._still_config)
                try:
                    image, md = self._fresh_still(cam, requested_ns)
                finally:
                    cam.switch_mode(self._preview_config)
            except CameraError:
                raise
            except Exception as exc:
                raise CameraError(_failure("capture", exc)) from None
        metadata = {
            "backend": self.name,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "sensor_resolution": list(self.sensor_resolution),
            "format": STREAM_FORMAT,
            "locked_controls": _jsonable(self.locked_controls),
            "ae_lock": _jsonable(self.ae_lock),
            "requested_ns": requested_ns,
            "exposure_start_ns": _exposure_start_ns(md),
        }
        metadata.update({k: _jsonable(md[k]) for k in KEPT_METADATA if k in md})
        return Frame(image=image, source=f"picamera2 camera {self.camera_num}", metadata=metadata)

    def _fresh_still(self, cam, requested_ns: int) -> tuple[np.ndarray, dict]:
        # flush=requested_ns makes picamera2 drop frames that began exposing earlier; the check
        # below makes that a guarantee even on a picamera2 that ignores or lacks the flush.
        for _ in range(FRESH_TRIES):
            request = cam.capture_request(wait=TIMEOUT_S, flush=requested_ns)
            try:
                md = dict(request.get_metadata())
                start = _exposure_start_ns(md)
                if start is not None and start >= requested_ns:
                    return _to_rgb(request.make_array("main"), STREAM_FORMAT), md
            finally:
                request.release()
        raise CameraError(
            f"picamera2: {FRESH_TRIES} frames in a row were exposed before the capture was requested "
            "(or carried no SensorTimestamp); the camera pipeline is stalled: restart the service"
        )

    def preview(self) -> Frame:
        """A low-resolution RGB uint8 frame for the dashboard (not exposure-checked)."""
        with self._lock:
            cam = self._require_open()
            try:
                array = cam.capture_array("main", wait=TIMEOUT_S)
            except Exception as exc:
                raise CameraError(_failure("preview", exc)) from None
        image = _to_rgb(array, STREAM_FORMAT)
        return Frame(
            image=image,
            source=f"picamera2 camera {self.camera_num}",
            metadata={
                "backend": self.name,
                "preview": True,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
            },
        )

    def _require_open(self):
        if self._cam is None:
            raise CameraError("picamera2: the camera is closed")
        return self._cam

    def close(self) -> None:
        """Stop and close the camera; safe to call twice."""
        with self._lock:
            cam, self._cam = self._cam, None
        if cam is None:
            return
        # Closing runs on shutdown and after failures: an unplugged camera must not stop it.
        for step in (cam.stop, cam.close):
            try:
                step()
            except Exception:  # nothing left to do with a camera that is gone
                pass

    def __enter__(self) -> PiCamera:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size(value) -> tuple[int, int]:
    width, height = (int(v) for v in value)
    return width, height


def _even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def _still_size(config: CameraConfig, sensor: tuple[int, int]) -> tuple[int, int]:
    """width x height from the config; a missing side keeps the sensor's aspect; none = full sensor."""
    sw, sh = sensor
    if config.width and config.height:
        return _even(config.width), _even(config.height)
    if config.width:
        return _even(config.width), _even(config.width * sh / sw)
    if config.height:
        return _even(config.height * sw / sh), _even(config.height)
    return sw, sh


def _preview_size(preview_width: int, still: tuple[int, int]) -> tuple[int, int]:
    width = _even(min(preview_width, still[0]))
    return width, _even(width * still[1] / still[0])


def _to_rgb(array: np.ndarray, fmt: str) -> np.ndarray:
    """picamera2 array in `fmt` memory order -> contiguous RGB uint8 HxWx3."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CameraError(f"picamera2: expected an HxWxC uint8 array for {fmt}, got {array.dtype} {array.shape}")
    if fmt == "RGB888":  # B,G,R in memory
        rgb = array[..., 2::-1]
    elif fmt == "BGR888":  # R,G,B in memory
        rgb = array[..., :3]
    elif fmt == "XRGB8888":  # B,G,R,X in memory
        rgb = array[..., 2::-1]
    elif fmt == "XBGR8888":  # R,G,B,X in memory
        rgb = array[..., :3]
    else:
        raise CameraError(f"picamera2: pixel format {fmt} is not supported; use RGB888")
    return np.ascontiguousarray(rgb)


def ae_report(md: dict) -> tuple[str | None, bool | None]:
    """(which metadata said it, AE converged?) from one frame's metadata.

    libcamera >= 0.5.0 reports AeState (0 Idle, 1 Searching, 2 Converged); older ones the
    boolean AeLocked. (None, None) when the frame carries neither.
    """
    if md.get("AeState") is not None:
        try:
            return "AeState", int(md["AeState"]) == AE_STATE_CONVERGED
        except (TypeError, ValueError):
            return "AeState", False
    if md.get("AeLocked") is not None:
        return "AeLocked", bool(md["AeLocked"])
    return None, None


def _exposure_start_ns(md: dict) -> int | None:
    """When the frame began exposing: SensorTimestamp (ns, first pixel read out) minus ExposureTime (us)."""
    try:
        return int(md["SensorTimestamp"]) - 1000 * int(md["ExposureTime"])
    except (KeyError, TypeError, ValueError):
        return None


def _jsonable(value):
    """Camera metadata values as plain JSON types; anything else is dropped (None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, tuple | list | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return None


def _failure(what: str, exc: Exception) -> str:
    return (
        f"picamera2: {what} failed ({type(exc).__name__}: {exc}); "
        "the camera may be unplugged or its cable loose: check it and restart the service"
    )
