"""A hostile client against a real `leukocam serve` on loopback: fuzzed requests, slow and half-sent
connections, lying Content-Length, and uploads built to exhaust memory.

Each test starts the service as its own process (waitress, the demo bundle, a store under tmp_path)
and checks it from outside, the way an attacker on the lab network would see it. Counts are bounded
and seeded; `make soak` sets LEUKOCAM_SOAK=1 for the long versions (outside `make test`).
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageFilter

from tests.conftest import REPO
from tests.test_serve import free_port

SOAK = os.environ.get("LEUKOCAM_SOAK") == "1"
FUZZ_REQUESTS = 3000 if SOAK else 400
RSS_ROUNDS = 8 if SOAK else 1
RSS_BOUND_MB = 400
"""Peak resident memory of the whole service under hostile uploads (a 2 GB Pi runs it beside the OS)."""
CLIENT_TIMEOUT_S = 2


@contextmanager
def serving(tmp_path: Path, *, web_extra: str = ""):
    """`leukocam serve` as a process on a free port: yields (base URL, process)."""
    port = free_port()
    cfg = tmp_path / "leukocam.toml"
    cfg.write_text(
        f'[store]\ndata_dir = "{tmp_path / "store"}"\nmin_free_mb = 1\n'
        f"[web]\nport = {port}\nclient_timeout_s = {CLIENT_TIMEOUT_S}\n{web_extra}"
        f"[service]\nstartup_captures = 1\n"
    )
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "device.cli", "serve", "--config", str(cfg)], cwd=REPO, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if requests.get(base + "/api/health", timeout=2).status_code in (200, 503):
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the service did not answer within 90 s"
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def answers(base: str, timeout: float = 10) -> bool:
    try:
        return requests.get(base + "/api/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident memory since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc (not Linux?)")


# -- fuzz -------------------------------------------------------------------------------------------

IDS = ["1", "0", "-1", "2", str(2**31), str(2**63 - 1), str(2**63), str(2**64), "9" * 40, "1e3", "0x10", "abc"]
TEXT = [".", "..", "%2e%2e", "a/b", "S1", "ü", "%00", "x" * 300, "<script>", "' OR 1=1 --", "", " ", "\u202e"]
QUERY_KEYS = ["slide", "label", "review", "from", "to", "limit", "offset", "page", "cell", "capture", "next"]


def _template_value(name: str, rnd: random.Random) -> str:
    if name in ("kind",):
        return rnd.choice(["field", "crop", "heatmap", "other", ".."])
    return rnd.choice(IDS + TEXT)


def _json_body(rnd: random.Random) -> bytes:
    choice = rnd.randrange(9)
    if choice == 0:
        depth = rnd.choice([1000, 100_000])
        return ("[" * depth + "]" * depth).encode()
    if choice == 1:
        return b"{" + b'"a":{' * 20_000 + b"}" * 20_000
    if choice == 2:
        return rnd.choice([b"[]", b"17", b'"text"', b"null", b"true", b"{", b"\xff\xfe", b""])
    field = rnd.choice(["id", "label", "reviewer", "note", "trigger", "username", "password"])
    value = rnd.choice([1, -1, 2**70, 1.5, None, True, [], {}, ["blast"], {"a": 1}, "blast", "normal", "x" * 5000])
    return json.dumps({field: value, rnd.choice(["label", "id", "extra"]): rnd.choice(["confirm", 3, None])}).encode()


def fuzz_requests(routes: list[tuple[str, list[str]]], n: int, seed: int):
    """n (method, path, query, headers, body) tuples over the documented routes, seeded."""
    rnd = random.Random(seed)
    for _ in range(n):
        template, methods = rnd.choice(routes)
        path = template
        while "{" in path:
            start, end = path.index("{"), path.index("}")
            path = path[:start] + _template_value(path[start + 1 : end], rnd) + path[end + 1 :]
        method = rnd.choice(methods) if rnd.random() < 0.8 else rnd.choice(["PUT", "DELETE", "PATCH", "POST", "GET"])
        query = {rnd.choice(QUERY_KEYS): rnd.choice(IDS + TEXT + ["blast", "pending", "2024-13-45", "2026-01-01"])}
        headers, body = {}, None
        if method in ("POST", "PUT", "PATCH"):
            kind = rnd.randrange(3)
            if kind == 0:
                headers["Content-Type"], body = "application/json", _json_body(rnd)
            elif kind == 1:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                body = f"id={rnd.choice(TEXT)}&label={rnd.choice(TEXT)}&single_cell=1".encode()
            else:
                headers["Content-Type"] = "multipart/form-data; boundary=XX"
                body = b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
                body += bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 10, 300]))) + b"\r\n--XX--\r\n"
        yield method, path, query, headers, body


def _documented_routes(base: str) -> list[tuple[str, list[str]]]:
    spec = requests.get(base + "/api/openapi.json", timeout=10).json()
    routes = [(path, [m.upper() for m in ops]) for path, ops in spec["paths"].items()]
    # and the pages, which the document leaves out
    pages = ["/", "/captures", "/captures/{id}", "/slides", "/slides/{id}", "/status", "/upload", "/fragments/latest"]
    return routes + [(p, ["GET", "POST"]) for p in pages]


def run_fuzz(base: str, n: int, seed: int, session: requests.Session) -> list[str]:
    """Send the fuzz; return a line per 5xx or hang."""
    failures = []
    for method, path, query, headers, body in fuzz_requests(_documented_routes(base), n, seed):
        try:
            resp = session.request(method, base + path, params=query, headers=headers, data=body, timeout=20)
        except requests.ReadTimeout:
            failures.append(f"HANG {method} {path} {query}")
            continue
        except requests.ConnectionError as exc:
            failures.append(f"CONNECTION {method} {path}: {exc}")
            continue
        if resp.status_code >= 500 and not (path == "/api/health" and resp.status_code == 503):
            failures.append(f"{resp.status_code} {method} {path} {query} body={body!r:.80}: {resp.text[:200]}")
    return failures


def test_fuzz_gives_no_server_error_and_the_server_still_answers(tmp_path):
    with serving(tmp_path) as (base, proc):
        failures = run_fuzz(base, FUZZ_REQUESTS, seed=20261126, session=requests.Session())
        assert failures == [], "\n".join(failures[:20])
        assert proc.poll() is None and answers(base)
        log = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in log, log[log.index("Traceback") :][:3000]


def test_fuzz_with_login_on_gives_no_server_error(tmp_path):
    from device import accounts

    accounts.set_password(tmp_path / "store", "alice", "correct horse battery")
    with serving(tmp_path, web_extra='login = "always"\n') as (base, proc):
        session = requests.Session()
        token = session.get(base + "/api/csrf").json()["csrf_token"]
        login = session.post(
            base + "/login",
            json={"username": "alice", "password": "correct horse battery"},
            headers={"X-CSRFToken": token},
        )
        assert login.status_code == 200
        session.headers["X-CSRFToken"] = login.json()["csrf_token"]
        failures = run_fuzz(base, FUZZ_REQUESTS // 4, seed=7, session=session)
        failures += run_fuzz(base, FUZZ_REQUESTS // 4, seed=8, session=requests.Session())  # logged out
        assert failures == [], "\n".join(failures[:20])
        assert proc.poll() is None and answers(base)


# -- slow clients -----------------------------------------------------------------------------------


def _half_sent(port: int, n: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(payload)
        socks.append(s)
    return socks


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes (or answers and closes) the connection within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize(
    "payload",
    [
        b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers never finished
        b"POST /api/slides HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{",  # a body that never comes (it used to hang the request)
        b"",  # connected, silent
    ],
    ids=["half-headers", "short-body", "silent"],
)
def test_slow_and_half_sent_connections_do_not_starve_the_rest(tmp_path, payload):
    """98 idle, half-sent connections froze the server: /api/health timed out after 20 s."""
    with serving(tmp_path) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        socks = _half_sent(port, 98, payload)
        try:
            for _ in range(3):
                assert answers(base, timeout=5), "the service stopped answering behind slow clients"
            # and the server drops them itself after client_timeout_s (+ its cleanup interval)
            closed = sum(_closed_by_server(s, within=CLIENT_TIMEOUT_S + 6) for s in socks[:10])
            assert closed == 10
        finally:
            for s in socks:
                s.close()
        assert answers(base)


# -- memory ----------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_peak_memory_under_hostile_uploads_stays_bounded(tmp_path):
    """A 162-byte 1x20000 PNG as a single cell, and four parallel 40 MP 1-bit PNGs, each took RSS to 1.7 GB."""
    from device.config import StoreConfig

    limit = StoreConfig().max_image_pixels
    side_w = int((limit * 4 / 3) ** 0.5)
    near_limit = _png(Image.new("1", (side_w, (limit - 1000) // side_w)))  # a few KB, just under the limit
    over_limit = _png(Image.new("1", (8000, 5000)))  # 40 MP: refused from its header
    tall = _png(Image.new("L", (1, 20000)))
    sliver = _png(Image.new("L", (16, 20000), 128))
    rng = np.random.default_rng(3)
    field = Image.fromarray(rng.integers(90, 230, (3040, 4056, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    buf = io.BytesIO()
    field.save(buf, format="JPEG", quality=90)
    big_jpeg = buf.getvalue()  # a 12 MP field that goes through the whole analysis

    def upload(base, data, name, single, codes):
        resp = requests.post(
            base + "/api/upload",
            files={"image": (name, data)},
            data={"single_cell": "1" if single else "0"},
            timeout=300,
        )
        codes.append((name, resp.status_code))

    with serving(tmp_path) as (base, proc):
        baseline = peak_rss_mb(proc.pid)
        codes: list = []
        for _ in range(RSS_ROUNDS):
            jobs = [(tall, "tall.png", True), (sliver, "sliver.png", True), (over_limit, "40mp.png", False)]
            jobs += [(near_limit, f"near{i}.png", False) for i in range(4)]
            jobs += [(near_limit, "near-cell.png", True), (big_jpeg, "field.jpg", False), (big_jpeg, "f2.jpg", False)]
            threads = [threading.Thread(target=upload, args=(base, *job, codes)) for job in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        peak = peak_rss_mb(proc.pid)
        print(f"peak RSS {peak:.0f} MB (at start {baseline:.0f} MB) over {len(codes)} hostile uploads")
        assert answers(base)
    expected = {"tall.png": 400, "sliver.png": 400, "40mp.png": 400, "near-cell.png": 400, "field.jpg": 201}
    for name, code in codes:
        assert code == expected.get(name, 201) or (name.startswith("near") and code == 201), (name, code)
    assert peak < RSS_BOUND_MB, f"peak RSS {peak:.0f} MB (baseline {baseline:.0f} MB) over {RSS_BOUND_MB} MB"
