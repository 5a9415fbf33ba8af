"""`leukocam serve` as a real process: waitress, start-up captures, health, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(tmp_path, startup_captures: int, **popen) -> tuple[subprocess.Popen, int, object]:
    """`leukocam serve` as a real process on a free port, storing under tmp_path: (process, port, config path)."""
    port = free_port()
    cfg = tmp_path / "leukocam.toml"
    cfg.write_text(
        f'[store]\ndata_dir = "{tmp_path / "store"}"\nmin_free_mb = 1\n'
        f"[web]\nport = {port}\n[service]\nstartup_captures = {startup_captures}\n"
    )
    popen = popen or {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.Popen([sys.executable, "-m", "device.cli", "serve", "--config", str(cfg)], cwd=REPO, **popen)
    return proc, port, cfg


def test_serve_shows_results_and_stops_cleanly_on_sigterm(tmp_path):
    proc, port, _ = start_serve(tmp_path, startup_captures=2)
    try:
        deadline, listing = time.time() + 120, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/captures", timeout=5) as r:
                    listing = json.load(r)
                if listing["total"] >= 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert listing and listing["total"] >= 2, "no start-up captures within the deadline"
        assert sum(c["n_cells"] for c in listing["captures"]) > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            health = json.load(r)
        assert health["ok"] and health["worker_alive"] and health["model"]["synthetic"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            html = r.read().decode()
        assert "/images/heatmap/" in html and r.headers["Server"] == "waitress"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "stopped cleanly" in out


def test_cli_capture_asks_the_running_service(tmp_path):
    """`leukocam capture` must not open the camera a second time while `serve` owns it."""
    proc, port, cfg = start_serve(tmp_path, startup_captures=0)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/captures", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, "-m", "device.cli", "capture", "--json", "--config", str(cfg)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout)
        assert result["capture"]["trigger"] == "cli" and result["capture"]["n_cells"] > 0  # taken by the service
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_serve_speaks_the_systemd_notify_protocol(tmp_path):
    """READY=1 once listening, WATCHDOG=1 while healthy, STOPPING=1 on SIGTERM (the unit is Type=notify)."""
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(120)
    env = {**__import__("os").environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
    proc, port, _ = start_serve(
        tmp_path, startup_captures=0, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen: list[str] = []
    try:
        while not any(m.startswith("READY=1") for m in seen):
            seen += sock.recv(4096).decode().splitlines()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/captures", timeout=5) as r:
            assert r.status == 200  # READY=1 came after the dashboard listens
        while "WATCHDOG=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
