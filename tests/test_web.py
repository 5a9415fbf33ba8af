"""The dashboard through Flask's test client over a real appliance and store."""

from __future__ import annotations

import io
import re

import pytest

from device.imaging import decode_image, encode_image
from device.service import Appliance
from device.web import create_app


@pytest.fixture
def app_and_client(config):
    with Appliance(config) as appliance:
        appliance.capture_now("test")
        app = create_app(appliance)
        yield appliance, app.test_client()


def test_index_lists_captures_with_cells_and_heatmaps(app_and_client):
    appliance, client = app_and_client
    html = client.get("/").get_data(as_text=True)
    assert "Capture 1" in html and "p(blast)" in html
    assert "SYNTHETIC demo model" in html
    heatmaps = re.findall(r'src="(/images/heatmap/\d+)"', html)
    assert heatmaps
    resp = client.get(heatmaps[0])
    assert resp.status_code == 200 and resp.mimetype == "image/jpeg"  # heatmap overlays are JPEG; crops stay PNG
    assert decode_image(resp.data).shape[2] == 3


def test_capture_page_and_api(app_and_client):
    appliance, client = app_and_client
    assert "Provenance" in client.get("/captures/1").get_data(as_text=True)
    data = client.get("/api/captures/1").get_json()
    assert data["id"] == 1 and data["cells"]
    assert client.get(data["cells"][0]["crop_url"]).status_code == 200
    listing = client.get("/api/captures?limit=5").get_json()
    assert listing["total"] == 1 and listing["captures"][0]["n_cells"] == len(data["cells"])


def test_unknown_ids_and_kinds_are_404(app_and_client):
    _, client = app_and_client
    assert client.get("/captures/999").status_code == 404
    assert client.get("/api/captures/999").get_json()["error"].startswith("no capture")
    assert client.get("/images/field/999").status_code == 404
    assert client.get("/images/passwd/1").status_code == 404
    assert client.get("/images/field/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_capture_button_queues_and_refuses_while_busy(app_and_client):
    appliance, client = app_and_client
    # The worker is not started in this test, so the first request stays queued: the second is refused.
    assert client.post("/api/capture").status_code == 202
    resp = client.post("/api/capture")
    assert resp.status_code == 409 and "in progress" in resp.get_json()["error"]
    assert client.post("/capture").status_code == 409


def test_upload_good_and_bad(app_and_client):
    appliance, client = app_and_client
    cell = appliance.bundle.golden.crops[0]
    ok = client.post(
        "/api/upload",
        data={"image": (io.BytesIO(encode_image(cell, "PNG")), "c.png"), "single_cell": "1"},
        content_type="multipart/form-data",
    )
    assert ok.status_code == 201 and ok.get_json()["status"] == "ok"
    for payload in (b"", b"GIF89a garbage", b"\xff\xd8\xff\xe0 truncated"):
        resp = client.post(
            "/api/upload", data={"image": (io.BytesIO(payload), "x.jpg")}, content_type="multipart/form-data"
        )
        assert resp.status_code == 400 and resp.get_json()["error"]
    assert client.post("/api/upload", data={}).status_code == 400
    health = client.get("/api/health")  # the capture worker is not started in these tests: unhealthy
    assert health.status_code == 503 and health.get_json()["worker_alive"] is False


def test_oversized_upload_is_413(config):
    import dataclasses

    cfg = dataclasses.replace(config, web=dataclasses.replace(config.web, max_upload_mb=1))
    with Appliance(cfg) as appliance:
        client = create_app(appliance).test_client()
        resp = client.post(
            "/api/upload", data={"image": (io.BytesIO(b"0" * 2_000_000), "big.jpg")}, content_type="multipart/form-data"
        )
        assert resp.status_code == 413


def test_security_headers(app_and_client):
    _, client = app_and_client
    resp = client.get("/")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "http://" not in resp.get_data(as_text=True).replace("http://www.w3.org", "")  # no external CDN


def test_preview_is_a_small_jpeg_of_the_camera(app_and_client):
    appliance, client = app_and_client
    resp = client.get("/api/preview.jpg")
    assert resp.status_code == 200 and resp.mimetype == "image/jpeg"
    img = decode_image(resp.data)
    assert img.shape[1] == appliance.config.camera.preview_width and img.shape[2] == 3
    assert resp.headers["Cache-Control"] == "no-store"


def test_bench_dashboard_runs_small():
    from device.web.load_bench import bench_dashboard

    result = bench_dashboard(n_captures=30, clients=3, seconds=2.0, requests_alone=3, max_requests_per_client=6)
    assert result["n_errors"] == 0, result["errors"]
    assert set(result["alone"]) == {"/captures", "/status"} and result["loaded"]["/captures"]["n"] >= 1
    assert "| /status |" in result["markdown"]


def test_every_page_renders_offline_and_responsive(app_and_client):
    appliance, client = app_and_client
    slide = appliance.slide_id
    for path in (
        "/",
        "/captures",
        "/captures/1",
        "/slides",
        f"/slides/{slide}",
        "/status",
        "/upload",
        "/fragments/latest",
    ):
        resp = client.get(path)
        assert resp.status_code == 200, path
        html = resp.get_data(as_text=True)
        assert not re.search(r'(src|href)="(https?:)?//', html), f"{path} loads something from another host"
        if path != "/fragments/latest":
            assert 'name="viewport"' in html and 'name="csrf-token"' in html
    css = client.get("/static/style.css").get_data(as_text=True)
    assert "@media print" in css and "@media (max-width" in css


def test_gallery_filters_and_paging(app_and_client):
    appliance, client = app_and_client
    for _ in range(12):
        appliance.capture_now("test")
    page1 = client.get("/captures").get_data(as_text=True)
    assert "13 match" in page1 and "page 1 of 2" in page1 and "Capture 13" in page1
    page2 = client.get("/captures?page=2").get_data(as_text=True)
    assert "Capture 1<" in page2 or "Capture 1 " in page2 or "Capture 1</b>" in page2
    api = client.get(f"/api/captures?slide={appliance.slide_id}&limit=5&offset=10").get_json()
    assert api["total"] == 13 and len(api["captures"]) == 3
    assert client.get("/api/captures?slide=NOPE").get_json()["total"] == 0
    assert client.get("/captures?review=maybe").status_code == 400
    assert client.get("/api/captures?label=blue").status_code == 400


def test_status_page_and_model_card(app_and_client):
    appliance, client = app_and_client
    html = client.get("/status").get_data(as_text=True)
    assert appliance.bundle.sha256 in html and "threshold" in html and "SYNTHETIC" in html
    assert "median ms" in html and "classify" in html and "self-test" in html and "MB free" in html
    data = client.get("/api/status").get_json()
    assert data["model"]["sha256"] == appliance.bundle.sha256 and data["model"]["synthetic"] is True
    assert data["latency_ms"]["total"]["n"] == 1 and data["latency_ms"]["total"]["p95_ms"] > 0
    assert data["model"]["metrics"]["sensitivity"] > 0 and "label_agreement" in data["model"]["verification"]


def test_status_page_shows_the_quantization_mode_and_its_measured_cost(config, tmp_path, demo_bundle_dir):
    import dataclasses
    import json
    import shutil

    # The shipped demo bundle climbed the timed ladder: plain int8 failed the gate, int8 after quantization-aware
    # fine-tuning shipped; the page names the fallback and gives the int8 kernels' time, no "slower" warning.
    with Appliance(config) as appliance:
        client = create_app(appliance).test_client()
        html = client.get("/status").get_data(as_text=True)
        model = client.get("/api/status").get_json()["model"]
    assert model["quantization"] == "int8" and model["quantization_label"] == "int8 quantization-aware"
    assert model["speed"]["note"].startswith("int8 quantization-aware: ") and "ms per cell" in model["speed"]["note"]
    assert model["speed"]["int8_kernels"] is True
    row = re.search(r'<td id="quantization">(.*?)</td>', html, re.S).group(1)
    assert "int8 quantization-aware" in row and "slower" not in row and "warn" not in row
    assert "fallback" in row and [f["mode"] for f in model["fallbacks"]] == ["int8"]  # never silent
    assert "label agreement" in row
    # A bundle from before the timed ladder (dynamic range shipped after int8 failed; no ladder, no times, no
    # "chosen" mark): the mode and the fallbacks it recorded, no cost.
    old = tmp_path / "old"
    shutil.copytree(demo_bundle_dir, old)
    meta = json.loads((old / "model.json").read_text())
    del meta["quantization"]["ladder"], meta["quantization"]["latency"]
    meta["quantization"].update(
        mode="dynamic",
        float_layers=[],
        attempts=[
            {"mode": "int8", "passed": False, "failures": ["label agreement 0.946 < 0.99"]},
            {"mode": "dynamic", "passed": True, "failures": []},
        ],
    )
    (old / "model.json").write_text(json.dumps(meta))
    with Appliance(dataclasses.replace(config, model=dataclasses.replace(config.model, bundle=str(old)))) as appliance:
        client = create_app(appliance).test_client()
        html = client.get("/status").get_data(as_text=True)
        model = client.get("/api/status").get_json()["model"]
    assert model["quantization"] == model["quantization_label"] == "dynamic" and model["speed"] is None
    row = re.search(r'<td id="quantization">(.*?)</td>', html, re.S).group(1)
    assert row.startswith("dynamic") and "slower" not in row
    assert model["fallbacks"] == [{"mode": "int8", "failures": ["label agreement 0.946 < 0.99"]}]
    assert "fallback" in row and "int8 (label agreement 0.946 &lt; 0.99)" in row
    # A bundle whose ladder convert timed: int16x8 shipped after int8 failed; the status page says the cost.
    bundle = tmp_path / "ladder"
    shutil.copytree(demo_bundle_dir, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    meta["quantization"].update(
        mode="int16x8",
        float_layers=[],
        ladder=["int8", "int8 with 10 float layers", "dynamic", "float16", "int16x8"],
        attempts=[
            {"mode": "int8", "passed": False, "failures": ["label agreement 0.977 < 0.99"], "latency_ms": 12.0},
            {"mode": "int16x8", "passed": True, "failures": [], "latency_ms": 780.0, "chosen": True},
        ],
        latency={"ms_per_crop": 780.0, "threads": 2, "batch": 1, "int8_ms_per_crop": 12.0, "vs_int8": 65.0},
    )
    (bundle / "model.json").write_text(json.dumps(meta))
    cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, bundle=str(bundle)))
    with Appliance(cfg) as appliance:
        client = create_app(appliance).test_client()
        html = client.get("/status").get_data(as_text=True)
        model = client.get("/api/status").get_json()["model"]
    assert model["speed"]["vs_int8"] == 65.0 and model["speed"]["ms_per_crop"] == 780.0
    assert model["speed"]["int8_kernels"] is False
    row = re.search(r'<td id="quantization">(.*?)</td>', html, re.S).group(1)
    assert '<strong class="warn">int16x8: 65× slower per cell than int8, measured at conversion' in row
    assert "780.0 ms against 12.0 ms per cell" in row
    assert "fallback" in row and "int8 (label agreement 0.977 &lt; 0.99)" in row
    assert model["fallbacks"] == [{"mode": "int8", "failures": ["label agreement 0.977 < 0.99"]}]
    # int8 after quantization-aware fine-tuning runs the int8 kernels: its time, never a "slower than int8".
    meta["quantization"].update(
        mode="int8",
        attempts=[
            {"mode": "int8", "passed": False, "failures": ["label agreement 0.946 < 0.99"], "latency_ms": 4.0},
            {"mode": "int8 quantization-aware", "passed": True, "failures": [], "latency_ms": 4.4, "chosen": True},
        ],
        latency={"ms_per_crop": 4.4, "threads": 2, "batch": 1, "int8_ms_per_crop": 4.0, "vs_int8": 1.1},
    )
    (bundle / "model.json").write_text(json.dumps(meta))
    with Appliance(cfg) as appliance:
        client = create_app(appliance).test_client()
        html = client.get("/status").get_data(as_text=True)
    row = re.search(r'<td id="quantization">(.*?)</td>', html, re.S).group(1)
    assert "int8 quantization-aware: 4.4 ms per cell, measured at conversion" in row and "slower" not in row
    assert "warn" not in row, "int8 kernels are the fast path: nothing to warn about"


def test_live_polling_endpoints(app_and_client):
    appliance, client = app_and_client
    latest = client.get("/api/latest").get_json()
    assert latest["latest_id"] == 1 and latest["busy"] is False and latest["slide_id"] == appliance.slide_id
    frag = client.get("/fragments/latest").get_data(as_text=True)
    assert 'data-capture-id="1"' in frag and "/images/heatmap/" in frag
