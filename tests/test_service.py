"""The appliance: replay camera -> find -> classify -> store, with its failure modes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pytest

from device.camera import Frame
from device.camera.replay import ReplayCamera
from device.errors import BusyError, CameraError, ImageError
from device.imaging import decode_image, encode_image
from device.service import Appliance


class FlakyCamera:
    """A camera that disappears for a number of captures, then comes back (like a loose ribbon cable)."""

    name = "flaky"

    def __init__(self, inner, failures: int):
        self.inner, self.failures, self.calls = inner, failures, 0

    def capture(self) -> Frame:
        self.calls += 1
        if self.calls <= self.failures:
            raise CameraError("camera not responding (simulated unplug)")
        return self.inner.capture()

    def preview(self) -> Frame:
        return self.inner.preview()

    def close(self):
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_capture_finds_and_classifies_cells_of_a_sample_field(config, demo_fields_dir):
    with Appliance(config) as app:
        outcome = app.capture_now("test")
        assert outcome.status == "ok", outcome.message
        cap = app.store.get_capture(outcome.capture_id)
    truth = json.loads((demo_fields_dir / cap["source"].replace(".jpg", ".json")).read_text())
    assert truth["synthetic"] is True
    assert cap["n_cells"] == len(truth["cells"])
    assert cap["model_sha256"] == app.bundle.sha256 and cap["model_synthetic"]
    for stage in ("capture", "scale", "qc", "find", "crop", "classify", "cells", "store"):
        assert stage in cap["timings"]
    for cell in cap["cells"]:
        assert 0.0 <= cell["probability"] <= 1.0
        assert app.store.image_file("heatmap", cell["id"]).is_file()


def test_demo_model_labels_sample_field_cells_better_than_chance(config, demo_fields_dir):
    # Ground truth of the synthetic fields lets us score the whole on-device pipeline.
    right = total = 0
    with Appliance(config) as app:
        for _ in range(len(list(demo_fields_dir.glob("*.jpg")))):
            cap = app.store.get_capture(app.capture_now("test").capture_id)
            truth = json.loads((demo_fields_dir / cap["source"].replace(".jpg", ".json")).read_text())["cells"]
            for cell in cap["cells"]:
                cx, cy = (cell["box"][0] + cell["box"][2]) / 2, (cell["box"][1] + cell["box"][3]) / 2
                match = [t for t in truth if t["box"][0] <= cx <= t["box"][2] and t["box"][1] <= cy <= t["box"][3]]
                assert match, f"found cell at {cx:.0f},{cy:.0f} matches no true white cell"
                total += 1
                right += (match[0]["label"] == "all") == cell["positive"]
    assert total >= 5
    assert right / total >= 0.6


def test_worker_queues_one_capture_and_refuses_overlap(config):
    with Appliance(config) as app:
        app.start()
        app.request_capture("web")
        with pytest.raises(BusyError, match="already in progress"):
            app.request_capture("web")
        deadline = time.time() + 60
        while app.captures_done < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert app.captures_done == 1
        assert app.store.count_captures() == 1
        assert app.health()["ok"]


def test_camera_error_is_retried_then_reported_without_crashing(config, demo_fields_dir):
    cam = FlakyCamera(ReplayCamera(demo_fields_dir), failures=2)
    with Appliance(config, camera=cam) as app:
        outcome = app.capture_now("test")
        assert outcome.status == "ok"  # 3 retries cover 2 failures
        assert cam.calls == 3
    cam = FlakyCamera(ReplayCamera(demo_fields_dir), failures=100)
    with Appliance(config, camera=cam) as app:
        stored_before = app.store.count_captures()
        app.start()
        app.request_capture("button")
        deadline = time.time() + 30
        while (app.last_outcome is None) and time.time() < deadline:
            time.sleep(0.05)
        assert app.last_outcome.status == "error"
        health = app.health()
        assert health["worker_alive"], "a camera failure must not stop the worker"
        assert "camera" in health["last_error"] and "simulated unplug" in health["last_error"]
        assert app.store.count_captures() == stored_before


def test_full_disk_refuses_capture_and_keeps_old_results(config, monkeypatch):
    with Appliance(config) as app:
        first = app.capture_now("test")
        app.wait_archived(60)
        before = app.store.get_capture(first.capture_id)
        monkeypatch.setattr(app.store, "min_free_mb", 10**12)
        outcome = app.capture_now("test")
        assert outcome.status == "error" and "disk" in outcome.message
        assert app.store.count_captures() == 1
        assert app.store.get_capture(first.capture_id) == before


def test_upload_of_single_cell_and_bad_files(config):
    with Appliance(config) as app:
        cell = app.bundle.golden.crops[0]
        outcome = app.analyse_upload(encode_image(cell, "PNG"), "cell.png", single_cell=True)
        cap = app.store.get_capture(outcome.capture_id)
        assert cap["n_cells"] == 1
        expected = app.classifier.classify(cell[None])[0].probability
        assert cap["cells"][0]["probability"] == pytest.approx(expected, abs=0.05)
        for bad in (b"", b"not an image", encode_image(np.zeros((8, 8, 3), np.uint8))[:40]):
            with pytest.raises(ImageError):
                app.analyse_upload(bad, "bad.jpg")
        assert app.store.count_captures() == 1


def _png(array, mode=None, fmt="PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format=fmt)
    return buf.getvalue()


def test_single_cell_uploads_get_the_same_checks_as_fields(config):
    """An all-black image, a 1x1 image and noise were each labelled blast (p 0.97-0.998) and counted."""
    rng = np.random.default_rng(7)
    cases = {
        "black.png": (np.zeros((960, 1280, 3), np.uint8), "black"),
        "one.png": (np.full((1, 1, 3), 200, np.uint8), "too small"),
        "noise.png": (rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), "noise"),
        "grey-noise.png": (np.repeat(rng.integers(0, 256, (200, 200, 1), dtype=np.uint8), 3, axis=2), "noise"),
        "white.png": (np.full((300, 300, 3), 255, np.uint8), "saturated"),
    }
    with Appliance(config) as app:
        for name, (image, reason) in cases.items():
            outcome = app.analyse_upload(_png(image), name, single_cell=True, add_to_slide=True)
            assert outcome.status == "retake" and reason in outcome.message, (name, outcome.message)
            assert app.store.get_capture(outcome.capture_id)["cells"] == []
        assert app.store.slide_summary(app.slide_id)["cells"] == 0


def test_high_bit_depth_cells_are_scaled_not_clipped(config):
    """16-bit PNG and TIFF used to be clipped to all-white and still labelled."""
    from tests.conftest import REPO

    real = decode_image(next((REPO / "tests/data/cnmc-sample").rglob("UID_1_3_1_all.png")))
    grey8 = np.asarray(real.mean(axis=2).round(), np.uint8)
    with Appliance(config) as app:
        reference = app.analyse_upload(_png(grey8), "cell8.png", single_cell=True)
        p8 = app.store.get_capture(reference.capture_id)["cells"][0]["probability"]
        for name, data in (
            ("cell16.png", _png(grey8.astype(np.uint16) * 257)),
            ("cell12.tif", _png(grey8.astype(np.uint16) * 16, fmt="TIFF")),
        ):
            outcome = app.analyse_upload(data, name, single_cell=True)
            assert outcome.status == "ok", (name, outcome.message)
            cells = app.store.get_capture(outcome.capture_id)["cells"]
            assert len(cells) == 1 and cells[0]["probability"] == pytest.approx(p8, abs=0.02), name


def test_uploads_count_in_a_slide_only_when_asked_and_thin_or_huge_ones_are_refused(config):
    with Appliance(config) as app:
        cell = app.bundle.golden.crops[0]
        plain = app.analyse_upload(encode_image(cell, "PNG"), "cell.png", single_cell=True)
        assert app.store.get_capture(plain.capture_id)["slide_id"] == "uploads"
        assert app.store.slide_summary(app.slide_id)["cells"] == 0
        counted = app.analyse_upload(encode_image(cell, "PNG"), "cell.png", single_cell=True, add_to_slide=True)
        assert app.store.get_capture(counted.capture_id)["slide_id"] == app.slide_id
        assert app.store.slide_summary(app.slide_id)["cells"] == 1
        before = app.store.count_captures()
        # 162 bytes claiming 1x20000 (padded to a 20000^2 square it took 1.7 GB); a sliver; an oversized crop
        for data, single, message in (
            (_png(np.zeros((20000, 1), np.uint8)), True, "too thin"),
            (_png(np.zeros((20, 2000), np.uint8)), False, "too thin"),
            (_png(np.zeros((2100, 2100), np.uint8)), True, "crop the image to the one cell"),
            (_png(np.zeros((3000, 6000), bool)), False, "over the 16.0 MP limit"),
            (_png(np.zeros((1000, 4100), bool)), False, "too thin"),
        ):
            with pytest.raises(ImageError, match=message):
                app.analyse_upload(data, "hostile.png", single_cell=single)
        assert app.store.count_captures() == before


def test_blurred_field_is_stored_as_retake(config, demo_fields_dir):
    import cv2

    from device.imaging import decode_image

    field = decode_image(next(demo_fields_dir.glob("*.jpg")))
    blurred = cv2.GaussianBlur(field, (0, 0), 6)
    with Appliance(config) as app:
        outcome = app.analyse_upload(encode_image(blurred, "PNG"), "blurred.png")
        assert outcome.status == "retake" and "focus" in outcome.message
        assert app.store.get_capture(outcome.capture_id)["status"] == "retake"


def test_gpio_button_captures_and_long_press_starts_a_slide(config):
    """The real gpiozero Button on a MockFactory pin, wired through the appliance."""
    import dataclasses

    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    previous, Device.pin_factory = Device.pin_factory, factory
    try:
        cfg = dataclasses.replace(
            config, trigger=dataclasses.replace(config.trigger, enabled=True, bounce_ms=5, long_press_s=0.4, led_pin=27)
        )
        with Appliance(cfg) as app:
            app.start()
            pin = factory.pin(cfg.trigger.button_pin)
            pin.drive_low()
            time.sleep(0.1)
            pin.drive_high()
            deadline = time.time() + 60
            while app.captures_done < 1 and time.time() < deadline:
                time.sleep(0.05)
            assert app.captures_done == 1
            cap = app.store.recent_captures(1)[0]
            assert cap["trigger"] == "button"
            deadline = time.time() + 10
            while app.trigger.state != "done" and time.time() < deadline:
                time.sleep(0.05)
            assert app.trigger.state == "done"
            first_slide = app.slide_id
            time.sleep(1.1)  # new slide IDs are time-stamped to the second
            pin.drive_low()
            deadline = time.time() + 5
            while app.slide_id == first_slide and time.time() < deadline:
                time.sleep(0.05)
            pin.drive_high()
            assert app.slide_id != first_slide and app.captures_done == 1  # a long press is not a capture
    finally:
        Device.pin_factory = previous
        factory.reset()
        factory.close()


def test_big_buffers_go_back_to_the_os():
    # glibc (the Pi's Raspberry Pi OS and this machine): mallopt accepts the fixed mmap threshold.
    from device.service import return_big_buffers_to_the_os

    assert return_big_buffers_to_the_os() is True


@pytest.mark.parametrize("calibrated, warns", [(0.1, False), (0.16, True)])
def test_field_image_and_scale_check_follow_the_stored_result(config, demo_fields_dir, calibrated, warns):
    # The demo fields are 0.1 µm/px: a calibration of 0.16 is another objective's.
    cfg = dataclasses.replace(config, finder=dataclasses.replace(config.finder, um_per_px=calibrated))
    with Appliance(cfg) as app:
        outcome = app.capture_now("test")
        assert outcome.status == "ok", outcome.message
        app.wait_archived(60)
        cap = app.store.get_capture(outcome.capture_id)
        field = app.store.image_file("field", outcome.capture_id)
        assert field.is_file() and decode_image(field).shape == (cap["height"], cap["width"], 3)
        assert {"archive", "scale_check"} <= set(cap["timings"])
        assert ("red cells suggest" in cap["message"]) is warns
        assert (app.health()["scale_warning"] is not None) is warns
        assert cap["n_cells"] > 0  # the warning does not touch the result


@pytest.mark.parametrize(("full_for", "what"), [("field.jpg", "field image"), ("cell_000.png", "cell crops")])
def test_full_disk_while_archiving_keeps_the_result_and_says_so(config, monkeypatch, full_for, what):
    # The archival copies follow the stored result: the crop PNGs, then the field JPEG. A full disk while
    # writing either keeps the result (and the other copy) and says which one is missing.
    import errno

    from device.store import captures as store_module

    with Appliance(config) as app:
        real_write = store_module.atomic_write_files

        def full_for_one(folder, files):
            if full_for in files:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(folder, files)

        monkeypatch.setattr(store_module, "atomic_write_files", full_for_one)
        outcome = app.capture_now("test")
        app.wait_archived(60)
        cap = app.store.get_capture(outcome.capture_id)
        assert outcome.status == "ok" and cap["n_cells"] > 0
        assert all(app.store.image_file("heatmap", c["id"]).is_file() for c in cap["cells"])
        crops = [app.store.image_file("crop", c["id"]).is_file() for c in cap["cells"]]
        assert crops == [what != "cell crops"] * len(crops)
        assert app.store.image_file("field", outcome.capture_id).is_file() is (what != "field image")
        error = app.health()["last_error"]
        assert f"{what} not saved" in error and "disk full" in error, error
        assert "archive" not in app.store.get_capture(outcome.capture_id)["timings"]


def test_a_failing_scale_check_is_reported_and_never_breaks_the_next_capture(config, monkeypatch):
    # What follows a result runs on the encoder thread; an unexpected error there (here in the scale check)
    # is logged and shown, and neither waiting for the archive nor the next capture or upload fails on it.
    import device.service

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault in the scale check")

    monkeypatch.setattr(device.service, "check_scale", broken)
    cfg = dataclasses.replace(config, finder=dataclasses.replace(config.finder, um_per_px=0.1))
    with Appliance(cfg) as app:
        first = app.capture_now("test")
        app.wait_archived(60)  # does not raise
        assert "scale check result not saved" in app.health()["last_error"]
        assert "simulated fault" in app.health()["last_error"]
        cap = app.store.get_capture(first.capture_id)
        assert all(app.store.image_file("crop", c["id"]).is_file() for c in cap["cells"])
        assert "archive" in cap["timings"]
        second = app.capture_now("test")
        assert second.status == "ok" and second.capture_id == first.capture_id + 1


def test_a_capture_deleted_before_its_copies_are_written_is_no_error(config, monkeypatch):
    # Retention runs right after a result is stored and may delete it (a retake on a reviewed slide): its
    # archival copies are then not wanted, and writing them must neither fail loudly nor leave a folder behind.
    import device.service

    real = device.service.encode_crops

    def deleted_first(analysis):
        cap = app.store.get_capture(app.archival.capture_id)
        with app.store.connect() as conn:
            conn.execute("DELETE FROM cells WHERE capture_id = ?", (cap["id"],))
            conn.execute("DELETE FROM captures WHERE id = ?", (cap["id"],))
        shutil.rmtree((app.store.images_dir / cap["field_file"]).parent)
        return real(analysis)

    monkeypatch.setattr(device.service, "encode_crops", deleted_first)
    with Appliance(config) as app:
        outcome = app.capture_now("test")
        app.wait_archived(60)
        assert app.store.get_capture(outcome.capture_id) is None
        assert app.health()["last_error"] is None
        assert app.store.reconcile(min_age_s=0).clean  # no orphan folder made by the late writes


def test_an_image_asked_for_while_it_is_written_is_served_when_written(config, monkeypatch):
    # The dashboard shows a result as soon as it is stored; its crops and field image are written a moment
    # later. A request in that moment waits for them instead of failing.
    import device.service
    from device.web import create_app

    real = device.service.encode_crops
    monkeypatch.setattr(device.service, "encode_crops", lambda analysis: time.sleep(1.0) or real(analysis))
    with Appliance(config) as app:
        client = create_app(app).test_client()
        outcome = app.capture_now("test")
        cell = app.store.get_capture(outcome.capture_id)["cells"][0]
        assert not app.store.image_file("crop", cell["id"]).is_file()  # still being written
        reply = client.get(f"/images/crop/{cell['id']}")
        assert reply.status_code == 200
        np.testing.assert_array_equal(decode_image(reply.data), decode_image(app.store.image_file("crop", cell["id"])))
        assert client.get(f"/images/field/{outcome.capture_id}").status_code == 200


def test_capture_page_says_when_the_field_image_is_missing(config):
    from device.web import create_app

    with Appliance(config) as app:
        outcome = app.capture_now("test")
        app.wait_archived(60)
        client = create_app(app).test_client()
        page = lambda: client.get(f"/captures/{outcome.capture_id}").get_data(as_text=True)  # noqa: E731
        assert "not on disk" not in page()
        app.store.image_file("field", outcome.capture_id).unlink()  # as after a power cut before the JPEG
        assert "The field image is not on disk" in page()
        reply = client.get(f"/images/field/{outcome.capture_id}")
        assert reply.status_code == 404 and "power cut" in reply.get_data(as_text=True)


def _run_startup(config, n: int) -> Appliance:
    cfg = dataclasses.replace(config, service=dataclasses.replace(config.service, startup_captures=n))
    app = Appliance(cfg)
    app.start()
    deadline = time.time() + 120
    while app.captures_done < n and time.time() < deadline:
        time.sleep(0.05)
    app.wait_archived()
    assert app.captures_done == n, "the start-up captures did not finish"
    return app


def test_startup_captures_go_to_their_own_slide_and_count_once_over_restarts(config):
    from device.service import STARTUP_SLIDE

    app = _run_startup(config, 3)
    try:
        today = app.slide_id
        assert today.startswith("slide-") and today != STARTUP_SLIDE  # the current slide stays today's
        caps = app.store.search_captures()[1]
        assert len(caps) == 3 and {c["slide_id"] for c in caps} == {STARTUP_SLIDE}
        assert {c["trigger"] for c in caps} == {"startup"}
        assert app.store.slide_summary(today)["captures"] == 0
        first = app.store.slide_summary(STARTUP_SLIDE)
        assert first["cells"] > 0 and first["duplicates"] == 0
    finally:
        app.stop()
    # A restart captures the same fields again: its cells are repeats, and the start-up slide does not grow.
    app = _run_startup(config, 3)
    try:
        again = app.store.slide_summary(STARTUP_SLIDE)
        assert again["captures"] == 6
        assert (again["cells"], again["positive"]) == (first["cells"], first["positive"])
        assert again["duplicates"] == first["cells"]
        assert again["blast_fraction_ci95"] == first["blast_fraction_ci95"]
    finally:
        app.stop()
