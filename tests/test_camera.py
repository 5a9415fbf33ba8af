"""Camera backends: picamera2 (against the working fake in tests/fakes), replay, OpenCV, build_camera."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.camera import Frame, build_camera
from device.camera.replay import ReplayCamera
from device.config import CameraConfig, Config
from device.errors import CameraError, ConfigError

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes"


@pytest.fixture
def fake_picamera2(monkeypatch):
    """The fake picamera2 package, importable only inside this test; dropped again afterwards."""
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    import picamera2

    assert Path(picamera2.__file__).is_relative_to(FAKES), "a real picamera2 shadows the fake"
    yield picamera2
    sys.modules.pop("picamera2", None)


def red_left_half(width: int = 320, height: int = 240) -> np.ndarray:
    scene = np.zeros((height, width, 3), np.uint8)
    scene[:, : width // 2] = (255, 0, 0)
    scene[:, width // 2 :] = (0, 0, 255)
    return scene


def open_picam(**camera):
    from device.camera.picam import PiCamera

    return PiCamera(CameraConfig(backend="picamera2", **camera))


# --- picamera2 -------------------------------------------------------------------------------


def test_picamera2_red_stays_red(fake_picamera2):
    fake_picamera2.SCENE = red_left_half()
    with open_picam() as cam:
        frame = cam.capture()
        # The fake hands "RGB888" back as B,G,R in memory, as the real library does.
        assert cam._cam.camera_config is not None
        raw = fake_picamera2.CompletedRequest(cam._cam, {}).make_array("main")
    h, w, _ = frame.image.shape
    left, right = frame.image[:, : w // 2 - 4], frame.image[:, w // 2 + 4 :]
    assert frame.image.dtype == np.uint8 and frame.image.shape[2] == 3
    assert np.all(left[..., 0] > 240) and np.all(left[..., 1:] < 15)  # red stays red
    assert np.all(right[..., 2] > 240) and np.all(right[..., :2] < 15)  # blue stays blue
    assert raw[0, 0, 2] > 240 and raw[0, 0, 0] < 15  # the preview stream's memory order is BGR
    assert frame.image.flags["C_CONTIGUOUS"]


def test_picamera2_full_sensor_resolution(fake_picamera2):
    fake_picamera2.SENSOR_RESOLUTION = (1332, 990)
    with open_picam() as cam:
        frame = cam.capture()
    assert frame.image.shape == (990, 1332, 3)
    assert frame.metadata["width"] == 1332 and frame.metadata["height"] == 990
    assert frame.metadata["sensor_resolution"] == [1332, 990]


def test_picamera2_resolution_from_config(fake_picamera2):
    with open_picam(width=800, height=600) as cam:
        assert cam.capture().image.shape == (600, 800, 3)
    with open_picam(width=500) as cam:  # the other side keeps the sensor's aspect (1014x760)
        assert cam.capture().image.shape == (374, 500, 3)


LIBCAMERA = {"libcamera-0.5": (0, 5, 0), "libcamera-0.4": (0, 4, 0)}
"""AeState and the mode controls from libcamera 0.5.0; AeLocked before."""
MODES = {"ExposureTimeMode": 1, "AnalogueGainMode": 1}


@pytest.fixture(params=list(LIBCAMERA), ids=list(LIBCAMERA))
def any_libcamera(request, fake_picamera2):
    """The fake picamera2 on a libcamera before and after AeLocked gave way to AeState."""
    fake_picamera2.LIBCAMERA_VERSION = LIBCAMERA[request.param]
    return fake_picamera2


def new_libcamera(fake) -> bool:
    return fake.LIBCAMERA_VERSION >= (0, 5, 0)


def test_picamera2_fixed_controls_from_config(any_libcamera):
    with open_picam(exposure_us=8000, analogue_gain=1.5, awb_red=2.4, awb_blue=1.3) as cam:
        fake = cam._cam
        frame = cam.capture()
    locked = fake.controls_log[-1]
    assert locked == {
        "AeEnable": False,
        **(MODES if new_libcamera(any_libcamera) else {}),
        "ExposureTime": 8000,
        "AnalogueGain": 1.5,
        "AwbEnable": False,
        "ColourGains": (2.4, 1.3),
    }
    assert "capture_metadata" not in fake.calls  # nothing to settle: every value is fixed
    assert frame.metadata["ExposureTime"] == 8000 and frame.metadata["AnalogueGain"] == 1.5
    assert frame.metadata["ColourGains"] == [2.4, 1.3]
    assert frame.metadata["locked_controls"]["AeEnable"] is False
    assert frame.metadata["ae_lock"] == {"ae": "config", "signal": None, "frames": 0}


def test_picamera2_auto_settles_then_locks(any_libcamera):
    fake_picamera2 = any_libcamera
    with open_picam() as cam:
        fake = cam._cam
        settle_frames = fake.calls.count("capture_metadata")
        first = cam.capture()
        second = cam.capture()
    # It waited for AE to report convergence (AeState or AeLocked), no longer, then fixed
    # exactly what AE/AWB had settled on.
    assert settle_frames == fake_picamera2.SETTLE_FRAMES + 1  # the first frame reporting it
    signal = "AeState" if new_libcamera(fake_picamera2) else "AeLocked"
    assert cam.ae_lock == {"ae": "converged", "signal": signal, "frames": settle_frames}
    assert fake.controls_log[-1] == {
        "AeEnable": False,
        **(MODES if new_libcamera(fake_picamera2) else {}),
        "ExposureTime": fake_picamera2.AUTO_EXPOSURE_US,
        "AnalogueGain": pytest.approx(fake_picamera2.AUTO_GAIN),
        "AwbEnable": False,
        "ColourGains": pytest.approx(fake_picamera2.AUTO_COLOUR_GAINS),
    }
    # The mode switches keep the lock: both stills report the locked values, and how it was reached.
    for frame in (first, second):
        assert frame.metadata["ExposureTime"] == fake_picamera2.AUTO_EXPOSURE_US
        assert frame.metadata["ColourGains"] == pytest.approx(list(fake_picamera2.AUTO_COLOUR_GAINS))
        assert frame.metadata["ae_lock"] == cam.ae_lock
        if new_libcamera(fake_picamera2):
            assert frame.metadata["AeState"] == fake_picamera2.AE_STATE_IDLE  # AE is off once locked
            assert frame.metadata["ExposureTimeMode"] == 1 and frame.metadata["AnalogueGainMode"] == 1
            assert "AeLocked" not in frame.metadata
        else:
            assert frame.metadata["AeLocked"] is True and "AeState" not in frame.metadata
    assert fake.controls["AeEnable"] is False and fake.controls["AwbEnable"] is False


def test_picamera2_partial_config_settles_the_rest(any_libcamera):
    with open_picam(exposure_us=5000) as cam:
        fake = cam._cam
        frame = cam.capture()
    # Applied before settling; from libcamera 0.5 with ExposureTimeMode Manual, without which it is ignored.
    assert fake.controls_log[0] == {
        "ExposureTime": 5000,
        **({"ExposureTimeMode": 1} if new_libcamera(any_libcamera) else {}),
    }
    assert fake.controls_log[-1]["ExposureTime"] == 5000
    assert fake.controls_log[-1]["AnalogueGain"] == pytest.approx(any_libcamera.AUTO_GAIN)
    assert frame.metadata["ExposureTime"] == 5000
    assert frame.metadata["ae_lock"]["ae"] == "converged"


def test_fake_ignores_an_exposure_time_set_in_auto_mode_from_libcamera_0_5(fake_picamera2):
    """The fake holds the code to libcamera 0.5's rule: ExposureTime counts only with ExposureTimeMode Manual."""
    cam = fake_picamera2.Picamera2()
    cam.configure(cam.create_preview_configuration())
    cam.start()
    cam.set_controls({"ExposureTime": 5000})
    assert cam.capture_metadata()["ExposureTime"] != 5000
    cam.set_controls({"ExposureTime": 5000, "ExposureTimeMode": 1})
    assert cam.capture_metadata()["ExposureTime"] == 5000
    cam.close()


def test_picamera2_fixed_exposure_and_gain_do_not_wait_for_ae(any_libcamera):
    """AE is off (AeState Idle), only AWB settles: the minimum number of frames, not SETTLE_FRAMES."""
    from device.camera.picam import MIN_SETTLE_FRAMES

    with open_picam(exposure_us=8000, analogue_gain=1.5) as cam:
        settle_frames = cam._cam.calls.count("capture_metadata")
        frame = cam.capture()
    assert settle_frames == MIN_SETTLE_FRAMES
    assert frame.metadata["ae_lock"]["ae"] == "config" and frame.metadata["ae_lock"]["frames"] == MIN_SETTLE_FRAMES
    assert frame.metadata["ExposureTime"] == 8000 and frame.metadata["AnalogueGain"] == 1.5


def test_picamera2_ae_that_never_converges_is_locked_after_the_limit_and_said(any_libcamera, caplog):
    from device.camera.picam import SETTLE_FRAMES

    any_libcamera.SETTLE_FRAMES = 10 * SETTLE_FRAMES  # a scene AE cannot settle on in time
    with caplog.at_level("WARNING", logger="device.camera.picam"), open_picam() as cam:
        frame = cam.capture()
        settle_frames = cam._cam.calls.count("capture_metadata")
    signal = "AeState" if new_libcamera(any_libcamera) else "AeLocked"
    assert settle_frames == SETTLE_FRAMES
    assert frame.metadata["ae_lock"] == {"ae": "not converged", "signal": signal, "frames": SETTLE_FRAMES}
    assert "did not converge" in caplog.text and "exposure_us" in caplog.text


def test_ae_report_reads_ae_state_and_ae_locked():
    from device.camera.picam import ae_report

    assert ae_report({"AeState": 2}) == ("AeState", True)
    assert ae_report({"AeState": 1}) == ("AeState", False)
    assert ae_report({"AeState": 0, "AeLocked": True}) == ("AeState", False)  # the newer report wins
    assert ae_report({"AeLocked": True}) == ("AeLocked", True)
    assert ae_report({"AeLocked": False}) == ("AeLocked", False)
    assert ae_report({"ExposureTime": 100}) == (None, None)


def test_picamera2_timeouts_reach_the_library(fake_picamera2):
    """Every wait is TIMEOUT_S seconds; the fake says a picamera2 older than 0.3.20 would not honour it."""
    from device.camera.picam import TIMEOUT_S

    with open_picam() as cam:
        cam.capture()
        cam.preview()
        waits = list(cam._cam.waits)
    assert waits and all(w == (TIMEOUT_S, True) for w in waits)
    fake_picamera2.VERSION = "0.3.19"
    with open_picam() as cam:
        cam.capture()
        assert all(w == (TIMEOUT_S, False) for w in cam._cam.waits)


def test_fake_serves_stale_frames_without_flush(fake_picamera2):
    """The fake is a fair test of freshness: an unflushed request returns a pre-press frame."""
    fake_picamera2.STALE_FRAMES_ON_START = 2
    cam = fake_picamera2.Picamera2()
    cam.configure(cam.create_still_configuration())
    cam.start()
    t0 = time.monotonic_ns()
    md = cam.capture_request().get_metadata()
    assert md["SensorTimestamp"] - 1000 * md["ExposureTime"] < t0
    cam.queue_stale_frames(2)
    t1 = time.monotonic_ns()
    md = cam.capture_request(flush=True).get_metadata()
    assert md["SensorTimestamp"] - 1000 * md["ExposureTime"] >= t1
    cam.close()


@pytest.mark.parametrize("ignore_flush", [False, True], ids=["flush", "library-ignores-flush"])
def test_picamera2_still_exposed_after_the_press(fake_picamera2, ignore_flush):
    fake_picamera2.STALE_FRAMES_ON_START = 3  # every (re)start queues frames exposed earlier
    with open_picam() as cam:
        cam._cam.ignore_flush = ignore_flush
        cam._cam.queue_stale_frames(2)
        pressed = time.monotonic_ns()
        frame = cam.capture()
        calls = list(cam._cam.calls)
    assert frame.metadata["exposure_start_ns"] >= pressed
    assert frame.metadata["SensorTimestamp"] > pressed
    assert frame.metadata["requested_ns"] >= pressed
    assert any(c == "capture_request:flush=True" for c in calls)
    # The still is taken in the still mode and the camera returns to the preview mode.
    assert calls[-3:] == ["stop", "configure:preview", "start"]


def test_picamera2_gives_up_on_a_stalled_pipeline(fake_picamera2):
    with open_picam() as cam:
        cam._cam.ignore_flush = True
        fake_picamera2.STALE_FRAMES_ON_START = 20
        with pytest.raises(CameraError, match="exposed before the capture was requested"):
            cam.capture()


def test_picamera2_metadata_is_json(fake_picamera2):
    with open_picam() as cam:
        frame = cam.capture()
    text = json.dumps(frame.metadata, allow_nan=False)
    back = json.loads(text)
    for key in ("ExposureTime", "AnalogueGain", "ColourGains", "SensorTimestamp", "Lux", "locked_controls", "ae_lock"):
        assert key in back, key
    assert back["Lux"] == pytest.approx(412.5)
    assert back["locked_controls"]["ColourGains"] == back["ColourGains"]
    assert back["backend"] == "picamera2"
    assert "ColourCorrectionMatrix" not in back  # only the listed keys are kept


def test_picamera2_preview_is_small_and_rgb(fake_picamera2):
    fake_picamera2.SCENE = red_left_half()
    with open_picam(preview_width=320) as cam:
        frame = cam.preview()
    assert isinstance(frame, Frame)
    assert frame.image.shape == (240, 320, 3)  # the 1014x760 sensor's aspect
    assert frame.image[120, 10].tolist() == [255, 0, 0]
    assert frame.metadata["preview"] is True


def test_picamera2_unplugged_is_a_camera_error(fake_picamera2):
    with open_picam() as cam:
        cam._cam.unplug()
        with pytest.raises(CameraError, match=r"capture failed \(RuntimeError: Device timeout.*unplugged"):
            cam.capture()
        with pytest.raises(CameraError, match="preview failed"):
            cam.preview()


def test_picamera2_no_camera_attached(fake_picamera2):
    fake_picamera2.NO_CAMERA = True
    with pytest.raises(CameraError, match="cannot start camera 0.*ribbon cable"):
        open_picam()


def test_picamera2_close_stops_and_closes(fake_picamera2):
    cam = open_picam()
    fake = cam._cam
    cam.close()
    assert not fake.started and not fake.is_open
    assert "stop" in fake.calls and fake.calls[-1] == "close"
    cam.close()  # twice is fine
    with pytest.raises(CameraError, match="closed"):
        cam.capture()


def test_picamera2_missing_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import picamera2 -> ImportError
    with pytest.raises(CameraError, match=r"apt install python3-picamera2.*--system-site-packages"):
        open_picam()


def test_importing_device_camera_does_not_need_picamera2():
    import device.camera
    import device.camera.picam  # noqa: F401 - the import alone must work off a Pi

    assert device.camera.build_camera is build_camera


def test_only_picam_imports_picamera2():
    pattern = re.compile(r"^\s*(import\s+picamera2|from\s+picamera2\b)", re.MULTILINE)
    offenders = []
    for top in ("device", "training", "convert"):
        for path in (REPO / top).rglob("*.py"):
            if pattern.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == ["device/camera/picam.py"]


# --- replay ----------------------------------------------------------------------------------


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (32, 24), (10 * i, 100, 200)).save(folder / name)


def test_replay_loops_in_name_order(tmp_path):
    write_images(tmp_path, ["b.png", "a.png", "c.jpg"])
    (tmp_path / "notes.txt").write_text("not an image")
    with ReplayCamera(tmp_path) as cam:
        served = [cam.capture().source for _ in range(4)]
    assert served == ["a.png", "b.png", "c.jpg", "a.png"]


def test_replay_skips_a_file_removed_mid_run(tmp_path):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    cam = ReplayCamera(tmp_path)
    assert cam.capture().source == "a.png"
    (tmp_path / "b.png").unlink()
    frame = cam.capture()
    assert frame.source == "c.png" and frame.image.shape == (24, 32, 3)


def test_replay_corrupt_file_names_it(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cam = ReplayCamera(tmp_path)
    cam.capture()
    with pytest.raises(CameraError, match="broken.jpg"):
        cam.capture()


def test_replay_empty_folder(tmp_path):
    with pytest.raises(CameraError, match="no images"):
        ReplayCamera(tmp_path)
    with pytest.raises(CameraError, match="not found"):
        ReplayCamera(tmp_path / "missing")


# --- build_camera ----------------------------------------------------------------------------


def config_with(**camera) -> Config:
    return dataclasses.replace(Config(), camera=dataclasses.replace(CameraConfig(), **camera))


def test_build_camera_replay(tmp_path):
    write_images(tmp_path, ["a.png"])
    with build_camera(config_with(backend="replay", replay_dir=str(tmp_path))) as cam:
        assert cam.name == "replay" and cam.capture().source == "a.png"


def test_build_camera_picamera2(fake_picamera2):
    with build_camera(config_with(backend="picamera2", width=640, height=480)) as cam:
        assert cam.name == "picamera2"
        assert cam.capture().image.shape == (480, 640, 3)


def test_build_camera_unknown_backend():
    with pytest.raises(ConfigError, match="camera.backend = 'webcam'"):
        build_camera(config_with(backend="webcam"))


def test_build_camera_opencv_video_file(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "field.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG .avi files")
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[:, :32] = (0, 0, 255)  # red in BGR
    for _ in range(12):
        writer.write(bgr)
    writer.release()
    if not path.is_file() or path.stat().st_size == 0:
        pytest.skip("OpenCV wrote no video file (no MJPG encoder)")
    with build_camera(config_with(backend="opencv", opencv_device=str(path))) as cam:
        frame = cam.capture()
    assert cam.name == "opencv"
    assert frame.image.shape == (48, 64, 3)
    assert frame.image[24, 8, 0] > 200 and frame.image[24, 8, 2] < 60  # RGB: red on the left


def test_build_camera_opencv_missing_device(tmp_path):
    with pytest.raises(CameraError, match="cannot open"):
        build_camera(config_with(backend="opencv", opencv_device=str(tmp_path / "none.avi")))


def _video(path, frames: int = 12, size=(320, 240)):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for _ in range(frames):
        bgr = np.zeros((size[1], size[0], 3), np.uint8)
        bgr[..., 2] = 220  # red in OpenCV's BGR order
        writer.write(bgr)
    writer.release()
    return path


def test_opencv_camera_reads_a_real_video_as_rgb_with_a_small_preview(tmp_path):
    from device.camera.uvc import OpenCVCamera

    with OpenCVCamera(str(_video(tmp_path / "stage.avi"))) as cam:
        still = cam.capture()
        assert still.image.shape == (240, 320, 3) and still.image[..., 0].mean() > 150 > still.image[..., 2].mean()
        preview = cam.preview(width=160)
        assert preview.image.shape == (120, 160, 3) and preview.metadata["preview"] is True
        for _ in range(20):  # run off the end of the video: the camera is gone
            try:
                cam.capture()
            except CameraError as exc:
                assert "no frame" in str(exc)
                break
        else:
            raise AssertionError("the end of the video never became a CameraError")


def test_every_backend_has_the_whole_camera_protocol():
    from device.camera import Camera
    from device.camera.picam import PiCamera
    from device.camera.replay import ReplayCamera
    from device.camera.uvc import OpenCVCamera

    wanted = [name for name in ("capture", "preview", "close", "__enter__", "__exit__") if hasattr(Camera, name)]
    assert "preview" in wanted
    for backend in (PiCamera, ReplayCamera, OpenCVCamera):
        assert all(callable(getattr(backend, name, None)) for name in wanted), backend
