"""`leukocam doctor`: check the rig and say what to fix.

Checks the configuration, the camera (one frame), with the picamera2 backend
the installed picamera2 version, the GPIO button, the inference runtime, the
model bundle (with its golden self-test), the disk space and the clock. Every check is independent: one that fails, raises or
hangs never stops the others, and each has a time limit. It uses the same
code paths as `leukocam serve` (build_camera, Trigger, resolve_active_bundle),
so what passes here also starts there.

The service holds the camera and the GPIO pins while it runs: stop it first
(`sudo systemctl stop leukocam`), or those two checks fail with "busy".
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click

from device.config import Config, load_config

DEFAULT_DEVICE_CONFIG = Path("/etc/leukocam/leukocam.toml")
"""Used when --config is not given and this file exists (the Pi's installed config)."""
CAMERA_TIMEOUT_S = 10.0
"""Longest wait for the camera to open and deliver one frame."""
CHECK_TIMEOUT_S = 30.0
"""Longest wait for any other check (loading a model and running its self-test on a Pi 4)."""
CLOCK_FLOOR = datetime(2024, 1, 1, tzinfo=UTC)
"""A clock earlier than this has not been set (a Pi without a network or an RTC battery)."""
DISK_WARN_FACTOR = 10
"""Free space below this many times store.min_free_mb is a warning."""
SERVICE_BUSY_HINT = (
    "if the leukocam service is running it holds the device: "
    "`sudo systemctl stop leukocam`, run the doctor, then `sudo systemctl start leukocam`"
)
MARKS = {True: "✓", False: "✗", None: "!"}
PICAMERA2_PACKAGE = "python3-picamera2"
"""picamera2 comes from apt (the Raspberry Pi archive), not pip."""
PICAMERA2_MIN = (0, 3, 20)
"""First picamera2 whose capture_request(wait=<seconds>) is a timeout; before it, a number only means "wait"."""
PICAMERA2_UPGRADE = (
    "`sudo apt update && sudo apt install --only-upgrade python3-picamera2` (or `sudo apt full-upgrade`), "
    "then `sudo systemctl restart leukocam`; if apt offers nothing newer, the system is older than "
    "Raspberry Pi OS Bookworm: flash Raspberry Pi OS 64-bit (Bookworm) and run firmware_config/install.sh"
)


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    """Short name shown in the first column (config, camera, gpio, runtime, bundle, disk, clock)."""
    ok: bool | None
    """True passed, False failed, None skipped or a warning (does not fail the doctor)."""
    detail: str
    """What was found."""
    fix: str = ""
    """What to do about it; empty when nothing needs doing."""


def check_config(path: str | Path | None) -> tuple[Check, Config | None]:
    """Load and validate the config; the other checks use the result."""
    from device.errors import ConfigError

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        fix = f"correct {path} as the message says; firmware_config/leukocam.toml documents every key and its default"
        return Check("config", False, str(exc), fix), None
    if path is None:
        return Check(
            "config",
            True,
            "embedded default (demo: replay camera, SYNTHETIC demo bundle); pass --config for a rig's file",
        ), cfg
    return Check("config", True, f"{cfg.source}: valid"), cfg


def check_camera(cfg: Config) -> Check:
    """Open the configured camera, take one frame, close it."""
    from device.camera import build_camera

    backend = cfg.camera.backend
    try:
        camera = build_camera(cfg)
        try:
            frame = camera.capture()
        finally:
            camera.close()
    except Exception as exc:  # CameraError, or whatever a driver throws: all are "no frame"
        return Check("camera", False, f"{backend}: {exc}", _camera_fix(cfg, str(exc)))
    h, w = frame.image.shape[:2]
    return Check("camera", True, f"{backend}: one {w}x{h} frame ({frame.source})")


def _camera_fix(cfg: Config, message: str) -> str:
    backend = cfg.camera.backend
    if backend == "replay":
        return (
            f"set [camera] replay_dir to a folder of .jpg/.png field images "
            f'(now: {cfg.replay_dir}), or choose backend = "picamera2" / "opencv"'
        )
    if backend == "opencv":
        return (
            f"check the USB cable and that the camera is listed (`ls /dev/video*`, "
            f"`v4l2-ctl --list-devices`); [camera] opencv_device is {cfg.camera.opencv_device!r}; "
            f"the user needs the video group (`sudo usermod -aG video $USER`); {SERVICE_BUSY_HINT}"
        )
    if "dtype size changed" in message or "binary incompatibility" in message:
        return (
            "apt's simplejpeg (used by picamera2) is built for numpy 1.x and the venv has numpy 2: "
            "`/opt/leukocam/.venv/bin/pip install --ignore-installed --no-deps simplejpeg` "
            "(firmware_config/install.sh does this)"
        )
    if "not installed" in message or "No module named" in message:
        return (
            "`sudo apt install python3-picamera2`, and make the venv with --system-site-packages "
            "(firmware_config/install.sh does both)"
        )
    return (
        "check the ribbon cable (both ends seated, latches closed, contacts the right way round); "
        "`rpicam-hello --list-cameras` must list the camera, else check camera_auto_detect or "
        "dtoverlay=imx477 in /boot/firmware/config.txt (firmware_config/config.txt.snippet) and reboot; "
        + SERVICE_BUSY_HINT
    )


def dpkg_version(package: str) -> str | None:
    """The installed version of a Debian package (`dpkg-query`), or None (not installed, or no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return None
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    status, _, version = out.stdout.strip().partition(" ")
    if out.returncode != 0 or status != "installed" or not version:
        return None
    return version


def picamera2_version() -> tuple[str, str] | None:
    """(version, where it was found) of the installed picamera2, or None.

    apt's python3-picamera2 first (what install.sh installs), else a Python distribution
    named picamera2 (a pip install, or the test fake's metadata).
    """
    version = dpkg_version(PICAMERA2_PACKAGE)
    if version:
        return version, f"apt {PICAMERA2_PACKAGE}"
    try:
        return importlib.metadata.version("picamera2"), "Python package picamera2"
    except importlib.metadata.PackageNotFoundError:
        return None


def upstream_version(version: str) -> tuple[int, ...]:
    """Leading numbers of a version: Debian's epoch ('1:') and revision ('-1+rpt1') dropped.

    '0.3.30-1' -> (0, 3, 30); '1:0.3.19-2~bpo12' -> (0, 3, 19); '' -> ().
    """
    text = version.split(":", 1)[1] if re.match(r"^\d+:", version) else version
    if "-" in text:
        text = text.rsplit("-", 1)[0]
    found = re.match(r"^\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in found.group(0).split(".")) if found else ()


def check_picamera2(cfg: Config, find=None) -> Check:
    """With the picamera2 backend: the installed picamera2 is new enough for capture timeouts."""
    if cfg.camera.backend != "picamera2":
        return Check("picamera2", None, f"skipped: camera.backend is {cfg.camera.backend}")
    found = (find or picamera2_version)()
    if found is None:
        return Check(
            "picamera2",
            False,
            "picamera2 is not installed",
            "`sudo apt install python3-picamera2`, and make the venv with --system-site-packages "
            "(firmware_config/install.sh does both)",
        )
    version, where = found
    parsed = upstream_version(version)
    need = ".".join(map(str, PICAMERA2_MIN))
    if not parsed:
        return Check("picamera2", None, f"{where} {version}: cannot tell whether it is {need} or newer", "")
    if parsed < PICAMERA2_MIN:
        return Check(
            "picamera2",
            False,
            f"{where} {version} is older than {need}: its capture_request(wait=...) takes no timeout, "
            "so a camera that stops answering hangs a capture instead of failing it",
            PICAMERA2_UPGRADE,
        )
    return Check("picamera2", True, f"{where} {version} ({need} or newer: capture timeouts work)")


def check_gpio(cfg: Config, pin_factory=None) -> Check:
    """Claim the button (and LED, buzzer) pins through the service's own Trigger, then release them."""
    t = cfg.trigger
    if not t.enabled:
        return Check("gpio", None, "skipped: [trigger] enabled = false (no button)")
    pins = (
        f"button BCM{t.button_pin}"
        + (f", LED BCM{t.led_pin}" if t.led_pin else "")
        + (f", buzzer BCM{t.buzzer_pin}" if t.buzzer_pin else "")
    )
    fallbacks: list[str] = []
    try:
        from device.trigger import Trigger

        # gpiozero warns once per pin backend it could not load: keep the reasons for the report.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trigger = Trigger(t, _nothing, _nothing, pin_factory=pin_factory)
            finally:
                fallbacks = [str(w.message) for w in caught if "Falling back" in str(w.message)]
    except ImportError as exc:
        return Check(
            "gpio",
            False,
            f"gpiozero cannot be imported ({exc})",
            "install the [device] extra: /opt/leukocam/.venv/bin/pip install 'gpiozero>=2.0'",
        )
    except Exception as exc:
        text = str(exc)
        if "in use" in text:
            fix = f"another program holds the pin; {SERVICE_BUSY_HINT}"
        elif "ermission" in text:
            fix = "add the user to the gpio group: `sudo usermod -aG gpio $USER`, then log in again"
        else:
            fix = (
                "on a Raspberry Pi: `sudo apt install python3-lgpio` (the venv needs "
                "--system-site-packages) and the user in the gpio group "
                "(`sudo usermod -aG gpio $USER`); elsewhere set [trigger] enabled = false"
            )
        tried = f" ({'; '.join(fallbacks)})" if fallbacks else ""
        return Check("gpio", False, f"{pins}: {text}{tried}", fix + _cwd_hint())
    try:
        factory = type(trigger.button.pin_factory).__name__
    finally:
        trigger.close()
    if factory == "MockFactory" and pin_factory is None:
        return Check(
            "gpio",
            None,
            f"{pins}: mock pins (GPIOZERO_PIN_FACTORY=mock); the button cannot be pressed",
            "unset GPIOZERO_PIN_FACTORY on the rig",
        )
    if pin_factory is None and factory != "LGPIOFactory":
        return Check(
            "gpio",
            None,
            f"{pins}: claimed with {factory}, not lgpio",
            "`sudo apt install python3-lgpio` (the Pi 5 needs lgpio)" + _cwd_hint(),
        )
    return Check("gpio", True, f"{pins}: claimed and released ({factory})")


def _nothing() -> None:
    pass


def _cwd_hint() -> str:
    # lgpio creates its notification pipe (.lgd-nfy*) in the current directory when it is imported.
    cwd = os.getcwd()
    if os.access(cwd, os.W_OK):
        return ""
    return f"; lgpio needs a writable current directory and {cwd} is not: `cd /tmp` and run the doctor again"


def check_runtime() -> Check:
    """Which TFLite interpreter the classifier would use."""
    from device.runtime import runtime_name

    try:
        name = runtime_name()
    except Exception as exc:
        return Check(
            "runtime",
            False,
            str(exc),
            "/opt/leukocam/.venv/bin/pip install 'ai-edge-litert>=1.2' (part of the [device] extra)",
        )
    if name != "ai_edge_litert":
        return Check(
            "runtime",
            None,
            f"{name} (works; LiteRT is the one the device is tested with)",
            "pip install 'ai-edge-litert>=1.2' (the [device] extra)",
        )
    return Check("runtime", True, name)


def check_bundle(cfg: Config) -> Check:
    """Open the bundle the service would run and run its golden self-test.

    On a bundle store whose `current` fails, this rolls back to `previous`, as the next
    start of the service would, and says so.
    """
    from device.bundle_store import resolve_active_bundle

    path = cfg.bundle_path
    try:
        active = resolve_active_bundle(path, threads=cfg.model.threads, self_test=True)
    except PermissionError as exc:
        return Check(
            "bundle",
            False,
            f"{path}: {exc}",
            "the store belongs to the service user: `cd /tmp && sudo -u leukocam leukocam doctor`",
        )
    except Exception as exc:
        return Check(
            "bundle",
            False,
            str(exc),
            "install a good bundle: `make deploy PI=...` from the workstation, or on the Pi "
            f"`sudo -u leukocam leukocam install-bundle BUNDLE --store {path}`; "
            "`leukocam list-bundles` shows what is installed",
        )
    try:
        b = active.bundle
        parts = [f"{b.path.name} (sha256 {b.sha256[:12]}, {active.classifier.runtime})"]
        if active.self_test is not None:
            parts.append(active.self_test.message)
        if b.synthetic:
            parts.append("SYNTHETIC demo model, not for clinical use")
    finally:
        active.classifier.close()
    if active.rolled_back:
        return Check(
            "bundle",
            None,
            f"{active.note}; " + "; ".join(parts),
            "install a bundle that passes its checks (`make deploy PI=...`); the rolled-back one is running meanwhile",
        )
    return Check("bundle", True, "; ".join(parts))


def check_disk(cfg: Config) -> Check:
    """Free space where results are stored, against store.min_free_mb."""
    data_dir = Path(cfg.store.data_dir)
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 1e6  # MB as in device.store, so the numbers agree
    need = cfg.store.min_free_mb
    where = str(data_dir) if probe == data_dir else f"{data_dir} (not created yet; measured at {probe})"
    detail = f"{where}: {free_mb:,.0f} MB free, store.min_free_mb = {need}"
    fix = (
        "back up and delete old results (docs/pi.md, 'Backup and restore'), set "
        "[store] max_images_mb for retention, or use a larger SD card"
    )
    if free_mb < need:
        return Check("disk", False, detail + "; captures are refused", fix)
    if free_mb < DISK_WARN_FACTOR * need:
        return Check("disk", None, detail + f"; under {DISK_WARN_FACTOR}x the minimum", fix)
    return Check("disk", True, detail)


def ntp_synchronized() -> bool | None:
    """`timedatectl show -p NTPSynchronized --value`: True/False, or None when it cannot tell."""
    if shutil.which("timedatectl") is None:
        return None
    try:
        out = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    if out.returncode != 0 or value not in ("yes", "no"):
        return None
    return value == "yes"


def check_clock(now: datetime | None = None, synchronized: Callable[[], bool | None] = ntp_synchronized) -> Check:
    """The system clock is plausible and, where systemd can tell, NTP-synchronized."""
    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%d %H:%M UTC")
    fix = (
        "results are timestamped: connect the Pi to a network with NTP (`sudo timedatectl set-ntp true`), "
        "or set the time by hand (`sudo date -s '2025-01-31 14:00'`); a Pi 5 keeps time across "
        "power cuts only with an RTC battery"
    )
    if now < CLOCK_FLOOR:
        return Check("clock", False, f"{stamp}: earlier than {CLOCK_FLOOR:%Y-%m-%d}, the clock is not set", fix)
    sync = synchronized()
    if sync is False:
        return Check("clock", None, f"{stamp}: not NTP-synchronized", fix)
    if sync is None:
        return Check("clock", True, f"{stamp} (NTP state unknown: no timedatectl answer)")
    return Check("clock", True, f"{stamp}, NTP-synchronized")


def run_guarded(name: str, fn: Callable[[], Check], timeout: float) -> Check:
    """Run one check in a thread: an exception or a hang becomes a failed Check, never a crash."""
    box: list[Check] = []

    def target() -> None:
        try:
            box.append(fn())
        except Exception as exc:
            box.append(
                Check(
                    name,
                    False,
                    f"the check itself failed ({type(exc).__name__}: {exc})",
                    "run `leukocam -v doctor` for details and report it",
                )
            )

    thread = threading.Thread(target=target, name=f"doctor-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or not box:
        return Check(
            name,
            False,
            f"no answer within {timeout:.0f} s",
            SERVICE_BUSY_HINT if name in ("camera", "gpio") else "run `leukocam -v doctor` to see where it hangs",
        )
    return box[0]


def run_checks(config_path: str | Path | None, pin_factory=None) -> list[Check]:
    """All checks, in order. Those that need the config are skipped when it does not load."""
    config_check, cfg = check_config(config_path)
    checks = [config_check]
    needs_config: list[tuple[str, Callable[[Config], Check], float]] = [("camera", check_camera, CAMERA_TIMEOUT_S)]
    if cfg is not None and cfg.camera.backend == "picamera2":
        needs_config.append(("picamera2", check_picamera2, CHECK_TIMEOUT_S))
    needs_config.append(("gpio", lambda c: check_gpio(c, pin_factory), CHECK_TIMEOUT_S))
    for name, fn, timeout in needs_config:
        checks.append(_with_config(name, fn, cfg, timeout))
    checks.append(run_guarded("runtime", check_runtime, CHECK_TIMEOUT_S))
    checks.append(_with_config("bundle", check_bundle, cfg, CHECK_TIMEOUT_S))
    checks.append(_with_config("disk", check_disk, cfg, CHECK_TIMEOUT_S))
    checks.append(run_guarded("clock", check_clock, CHECK_TIMEOUT_S))
    return checks


def _with_config(name: str, fn: Callable[[Config], Check], cfg: Config | None, timeout: float) -> Check:
    if cfg is None:
        return Check(name, None, "skipped: the config did not load", "fix the config first")
    return run_guarded(name, lambda: fn(cfg), timeout)


def format_report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{MARKS[c.ok]} {c.name:<{width}}  {c.detail}")
        if c.fix and c.ok is not True:
            lines.append(f"  {'':<{width}}  fix: {c.fix}")
    failed = sum(c.ok is False for c in checks)
    other = sum(c.ok is None for c in checks)
    passed = sum(c.ok is True for c in checks)
    lines.append(f"{passed} passed, {failed} failed, {other} skipped or warnings")
    return "\n".join(lines)


@click.command("doctor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"TOML config (default: {DEFAULT_DEVICE_CONFIG} when it exists, else the embedded demo).",
)
def doctor(config_path):
    """Check camera (and picamera2's version), GPIO, runtime, model bundle, disk and clock; say what to fix."""
    if config_path is None and DEFAULT_DEVICE_CONFIG.is_file():
        config_path = str(DEFAULT_DEVICE_CONFIG)
    t0 = time.monotonic()
    checks = run_checks(config_path)
    click.echo(f"LeukoCam doctor, config {config_path or '<embedded default>'}")
    click.echo(format_report(checks))
    click.echo(f"({time.monotonic() - t0:.1f} s)")
    if any(c.ok is False for c in checks):
        raise SystemExit(1)
