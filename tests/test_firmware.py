"""What goes onto the Pi (firmware_config/): the unit, the install script, the default config,
the avahi file, the boot snippet, the sd_notify helper, and the device dependencies for aarch64.

The systemd and shellcheck checks need `systemd-analyze` and `shellcheck` (Debian packages
`systemd` and `shellcheck`). Outside CI a missing tool skips its test; in CI (CI is set) it fails.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from device import sdnotify
from device.config import load_config

REPO = Path(__file__).resolve().parents[1]
FW = REPO / "firmware_config"
UNIT = FW / "leukocam.service"
INSTALL = FW / "install.sh"
AVAHI = FW / "leukocam.avahi.service"
SNIPPET = FW / "config.txt.snippet"
DEFAULT_TOML = FW / "leukocam.toml"


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed: apt-get install -y {package}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run this check)")
    pytest.skip(message)


def unit_lines() -> dict[str, list[str]]:
    """key -> values of every `key=value` line (systemd allows a key more than once)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


# -- the systemd unit ---------------------------------------------------------------------------
def verify_unit(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on a copy of the unit text.

    verify refuses an ExecStart= binary that does not exist, and /opt/leukocam/.venv is not here,
    so the copy runs this test's Python instead (same arguments). User=leukocam needs no
    substitution: verify does not resolve users. verify exits 0 even for unknown keys or bad
    values, printing a warning that names the file, so any line naming the file is a failure.
    """
    tool = need_tool("systemd-analyze", "systemd")
    copy = tmp_path / "leukocam.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, flags=re.M), encoding="utf-8")
    return subprocess.run(
        [tool, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def test_unit_passes_systemd_analyze_verify(tmp_path):
    result = verify_unit(tmp_path, UNIT.read_text(encoding="utf-8"))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "leukocam.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_verify_would_catch_a_typo(tmp_path):
    """Guards the test above: a misspelt key or value is reported, so 'no complaint' means something."""
    broken = UNIT.read_text(encoding="utf-8").replace("Restart=on-failure", "Restart=on-failur\nWatchDogSec=60")
    result = verify_unit(tmp_path, broken)
    output = result.stdout + result.stderr
    assert "on-failur" in output and "WatchDogSec" in output


def test_unit_runs_the_appliance_as_designed():
    u = unit_lines()
    assert u["ExecStart"] == ["/opt/leukocam/.venv/bin/leukocam serve --config /etc/leukocam/leukocam.toml"]
    assert u["Type"] == ["notify"] and u["WatchdogSec"] == ["60"]
    assert u["Restart"] == ["on-failure"] and u["TimeoutStopSec"] == ["40"]
    assert u["User"] == ["leukocam"] and u["Group"] == ["leukocam"]
    assert set(u["SupplementaryGroups"][0].split()) == {"video", "gpio"}
    assert u["StateDirectory"] == ["leukocam"] and u["ReadWritePaths"] == ["/var/lib/leukocam"]
    # lgpio writes its notification pipes into the working directory.
    assert u["WorkingDirectory"] == ["/var/lib/leukocam"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert u[key] == ["yes"], key
    assert u["ProtectSystem"] == ["strict"]
    # The camera (/dev/video*, /dev/media*, /dev/dma_heap) and /dev/gpiochip* must stay reachable.
    assert "PrivateDevices" not in u and "DevicePolicy" not in u
    assert "PYTHONUNBUFFERED=1" in u["Environment"]


def test_the_default_config_stores_where_the_unit_may_write():
    cfg = load_config(DEFAULT_TOML)
    allowed = unit_lines()["ReadWritePaths"][0]
    assert Path(cfg.store.data_dir) == Path(allowed)
    assert Path(cfg.model.bundle).is_relative_to(allowed)


# -- the default config, avahi, boot snippet ----------------------------------------------------
def test_default_toml_loads_into_the_config_model():
    cfg = load_config(DEFAULT_TOML)
    assert cfg.source == str(DEFAULT_TOML)
    assert cfg.camera.backend == "picamera2"
    assert cfg.trigger.enabled and cfg.trigger.button_pin == 17 and cfg.trigger.led_pin == 27
    assert cfg.model.bundle == "/var/lib/leukocam/bundles"
    assert cfg.service.startup_captures == 0


def test_avahi_file_advertises_the_dashboard():
    root = ET.parse(AVAHI).getroot()
    assert root.tag == "service-group"
    name = root.find("name")
    assert "LeukoCam" in name.text and "%h" in name.text and name.get("replace-wildcards") == "yes"
    service = root.find("service")
    assert service.find("type").text == "_http._tcp"
    port = int(service.find("port").text)
    assert port == 8080 == load_config(DEFAULT_TOML).web.port


def test_boot_snippet_enables_the_camera():
    text = SNIPPET.read_text(encoding="utf-8")
    active = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "camera_auto_detect=1" in active
    assert "#dtoverlay=imx477" in text  # the HQ-camera alternative, commented out
    mark = re.search(r'^SNIPPET_MARK="(.+)"$', INSTALL.read_text(encoding="utf-8"), flags=re.M).group(1)
    assert text.startswith(mark), "install.sh finds the snippet by its first line: keep them in step"


# -- the install script ---------------------------------------------------------------------------
def test_install_script_passes_shellcheck():
    tool = need_tool("shellcheck", "shellcheck")
    result = subprocess.run([tool, "--shell=bash", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60)


def test_install_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    prefix = tmp_path / "opt" / "leukocam"
    result = run_install("--dry-run", "--prefix", str(prefix), "--no-start")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.replace("\\", "")  # the plan is shell-quoted
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    plan = "\n".join(commands)
    assert "apt-get install -y --no-install-recommends python3-picamera2 python3-venv python3-lgpio" in plan
    assert re.search(r"^(useradd .*--groups video,gpio .*leukocam|usermod .*video,gpio leukocam)$", plan, re.M)
    assert f"python3 -m venv --system-site-packages {prefix}/.venv" in plan or (prefix / ".venv").exists()
    assert f"{prefix}/.venv/bin/python -m pip install {prefix}[device]" in plan
    assert re.search(r"leukocam install-bundle \S+/device/demo/bundle --store /var/lib/leukocam/bundles", plan)
    assert "systemctl daemon-reload" in plan and "systemctl enable leukocam" in plan
    assert "systemctl restart leukocam" not in plan  # --no-start
    assert f"sed s#/opt/leukocam#{prefix}#g" in plan  # the unit's paths follow --prefix
    assert "set-password" in out  # says what it did about the dashboard password
    assert not prefix.exists(), "--dry-run must not create anything"


def test_install_starts_the_service_unless_told_not_to(tmp_path):
    result = run_install("--dry-run", "--prefix", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    assert "+ systemctl restart leukocam" in result.stdout
    assert "hostnamectl" not in result.stdout


def test_install_sets_the_hostname_only_when_asked(tmp_path):
    result = run_install("--dry-run", "--prefix", str(tmp_path / "p"), "--hostname", "leukocam")
    assert result.returncode == 0, result.stderr
    assert "+ hostnamectl set-hostname leukocam" in result.stdout
    bad = run_install("--dry-run", "--hostname", "Bad_Name")
    assert bad.returncode == 2 and "--hostname" in bad.stderr


def test_install_refuses_unknown_options():
    result = run_install("--frobnicate")
    assert result.returncode == 2 and "unknown option" in result.stderr


# -- sd_notify -----------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd; yields a function returning what was received."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    def receive(timeout: float = 2.0) -> str:
        sock.settimeout(timeout)
        return sock.recv(4096).decode()

    yield receive
    sock.close()


def test_notify_sends_ready_watchdog_and_stopping(notify_socket):
    assert sdnotify.ready("dashboard on :8080")
    assert notify_socket() == "READY=1\nSTATUS=dashboard on :8080"
    assert sdnotify.watchdog_ping()
    assert notify_socket() == "WATCHDOG=1"
    assert sdnotify.stopping()
    assert notify_socket() == "STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_notify_supports_abstract_sockets(monkeypatch):
    name = f"leukocam-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(100) == b"READY=1"


def test_notify_is_a_no_op_outside_systemd(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.watchdog_ping() is False  # a send that fails is logged, never raised


def test_watchdog_interval_is_half_of_watchdogsec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None
    assert sdnotify.Watchdog(lambda: True).start()._thread is None  # no watchdog asked for: no thread


def test_watchdog_pings_only_while_healthy(notify_socket):
    healthy = threading.Event()
    healthy.set()
    with sdnotify.Watchdog(healthy.is_set, interval=0.05):
        assert notify_socket() == "WATCHDOG=1"
        healthy.clear()
        time.sleep(0.2)
        with contextlib.suppress(TimeoutError):  # pings sent before the switch may still be queued
            for _ in range(20):
                notify_socket(timeout=0.01)
        with pytest.raises(TimeoutError):
            notify_socket(timeout=0.3)


def test_http_answers():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)  # unhealthy but answering counts as alive
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert sdnotify.http_answers("0.0.0.0", port, timeout=2)
    finally:
        server.shutdown()
        server.server_close()
    assert not sdnotify.http_answers("127.0.0.1", port, timeout=2)


# -- the device dependencies on the Pi's platform -------------------------------------------------
# Raspberry Pi OS Bookworm: glibc 2.36, CPython 3.11, aarch64.
PI_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]
NETWORK_ERRORS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
    "Failed to establish a new connection",
)


def device_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["device"])
    return [r for r in reqs if not r.startswith("leukocam")]


@pytest.mark.slow
def test_device_dependencies_resolve_for_the_pi(tmp_path):
    """Binary wheels exist for every device dependency on aarch64 / CPython 3.11 (needs PyPI)."""
    reqs = device_requirements()
    assert any(r.startswith("ai-edge-litert") for r in reqs)
    # install.sh puts a numpy-2 simplejpeg into the venv (see there); it must resolve too.
    reqs.append("simplejpeg>=1.8.1")
    platforms = [arg for p in PI_PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        *platforms,
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--disable-pip-version-check",
        "-d",
        str(tmp_path),
        *reqs,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(e in output for e in NETWORK_ERRORS) and not os.environ.get("CI"):
        pytest.skip("PyPI is not reachable from here")
    assert result.returncode == 0, output[-4000:]
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    for name in ("numpy", "opencv_python_headless", "ai_edge_litert", "pillow", "simplejpeg"):
        found = [w for w in wheels if w.lower().startswith(name)]
        assert found and "aarch64" in found[0], (name, wheels)
    numpy_major = int(next(w for w in wheels if w.startswith("numpy-")).split("-")[1].split(".")[0])
    if numpy_major >= 2:
        assert "simplejpeg" in INSTALL.read_text(encoding="utf-8"), (
            "numpy 2 in the venv breaks apt's simplejpeg (picamera2): install.sh must shadow it"
        )
