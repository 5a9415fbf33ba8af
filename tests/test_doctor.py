"""`leukocam doctor` on real fakes: the replay camera, the shipped demo bundle, mock GPIO pins."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from device import doctor as doctor_module
from device.config import DEMO_BUNDLE
from device.doctor import Check, check_clock, doctor, format_report, run_checks, run_guarded


def write_config(tmp_path: Path, **sections: dict) -> Path:
    """A rig-like TOML: replay camera over the sample fields, demo bundle, store in tmp_path, no GPIO."""
    base = {
        "camera": {"backend": "replay"},
        "trigger": {"enabled": False},
        "model": {"threads": 1},
        "store": {"data_dir": str(tmp_path / "store"), "min_free_mb": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path = tmp_path / "leukocam.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def invoke(*args: str):
    result = CliRunner().invoke(doctor, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def rows(output: str) -> dict[str, str]:
    """check name -> its first line (mark, name, detail)."""
    found = {}
    for line in output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2 and parts[0] in ("✓", "✗", "!"):
            found[parts[1]] = line
    return found


def fix_after(output: str, name: str) -> str:
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.split(maxsplit=2)[1:2] == [name]:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            return nxt.strip() if nxt.strip().startswith("fix:") else ""
    raise AssertionError(f"no {name} row in:\n{output}")


ALL = ("config", "camera", "gpio", "runtime", "bundle", "disk", "clock")


def test_a_good_rig_passes(tmp_path):
    result = invoke("--config", str(write_config(tmp_path)))
    assert result.exit_code == 0, result.output
    found = rows(result.output)
    assert set(found) == set(ALL)
    for name in ("config", "camera", "runtime", "bundle", "disk"):
        assert found[name].startswith("✓"), result.output
    assert found["gpio"].startswith("!") and "skipped" in found["gpio"]
    assert "self-test" in found["bundle"] and "SYNTHETIC" in found["bundle"]
    assert "0 failed" in result.output
    assert not (tmp_path / "store").exists(), "the doctor must not create the store"


def test_a_broken_bundle_fails_with_a_fix_and_the_others_still_run(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF  # the sha256 in model.json no longer matches
    (bundle / "model.tflite").write_bytes(bytes(data))
    result = invoke("--config", str(write_config(tmp_path, model={"bundle": str(bundle)})))
    assert result.exit_code == 1
    found = rows(result.output)
    assert found["bundle"].startswith("✗")
    assert "install-bundle" in fix_after(result.output, "bundle")
    assert set(found) == set(ALL)
    for name in ("config", "camera", "runtime", "disk"):
        assert found[name].startswith("✓"), result.output


def test_a_missing_bundle_folder_fails(tmp_path):
    result = invoke("--config", str(write_config(tmp_path, model={"bundle": str(tmp_path / "nope")})))
    assert result.exit_code == 1
    assert rows(result.output)["bundle"].startswith("✗")
    assert fix_after(result.output, "bundle")


def test_a_missing_replay_folder_fails_the_camera_with_a_fix(tmp_path):
    cfg = write_config(tmp_path, camera={"replay_dir": str(tmp_path / "no-such-folder")})
    result = invoke("--config", str(cfg))
    assert result.exit_code == 1
    found = rows(result.output)
    assert found["camera"].startswith("✗") and "no-such-folder" in found["camera"]
    assert "replay_dir" in fix_after(result.output, "camera")
    assert found["bundle"].startswith("✓")


def test_too_little_disk_fails(tmp_path):
    result = invoke("--config", str(write_config(tmp_path, store={"min_free_mb": 10**12})))
    assert result.exit_code == 1
    assert rows(result.output)["disk"].startswith("✗")
    assert "back up" in fix_after(result.output, "disk")


def test_little_disk_is_a_warning(tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    result = invoke("--config", str(write_config(tmp_path, store={"min_free_mb": int(free_mb / 5)})))
    assert result.exit_code == 0, result.output
    assert rows(result.output)["disk"].startswith("!")


def test_a_bad_config_fails_and_skips_what_needs_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[camera]\nbackend = "webcam"\n', encoding="utf-8")
    result = invoke("--config", str(path))
    assert result.exit_code == 1
    found = rows(result.output)
    assert found["config"].startswith("✗") and "camera.backend" in found["config"]
    for name in ("camera", "gpio", "bundle", "disk"):
        assert found[name].startswith("!") and "skipped" in found[name]
    assert found["runtime"].startswith("✓")
    assert set(found) == set(ALL)


def test_without_config_it_uses_the_installed_one(tmp_path, monkeypatch):
    installed = write_config(tmp_path)
    monkeypatch.setattr(doctor_module, "DEFAULT_DEVICE_CONFIG", installed)
    result = invoke()
    assert f"config {installed}" in result.output
    assert result.exit_code == 0, result.output


def test_without_any_config_it_checks_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor_module, "DEFAULT_DEVICE_CONFIG", tmp_path / "absent.toml")
    monkeypatch.chdir(tmp_path)  # the embedded store is var/leukocam under the working directory
    result = invoke()
    assert "embedded default" in rows(result.output)["config"]
    assert result.exit_code == 0, result.output


def test_gpio_on_mock_pins_claims_and_releases(tmp_path):
    gpiozero = pytest.importorskip("gpiozero")
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    try:
        checks = run_checks(write_config(tmp_path, trigger={"enabled": True}), pin_factory=factory)
        gpio = next(c for c in checks if c.name == "gpio")
        assert gpio.ok is True, gpio
        assert "BCM17" in gpio.detail and "BCM27" in gpio.detail
        # Released: the pins can be claimed again.
        gpiozero.Button(17, pin_factory=factory).close()
    finally:
        factory.reset()
        factory.close()


def test_gpio_with_the_mock_factory_by_default_is_a_warning(tmp_path, monkeypatch):
    gpiozero = pytest.importorskip("gpiozero")
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    monkeypatch.setattr(gpiozero.Device, "pin_factory", factory)
    try:
        checks = run_checks(write_config(tmp_path, trigger={"enabled": True}))
    finally:
        factory.reset()
        factory.close()
    gpio = next(c for c in checks if c.name == "gpio")
    assert gpio.ok is None and "mock" in gpio.detail


def test_no_gpio_backend_fails_with_a_fix(tmp_path, monkeypatch):
    gpiozero = pytest.importorskip("gpiozero")
    from gpiozero.exc import BadPinFactory

    def no_backend():
        raise BadPinFactory("Unable to load any default pin factory!")

    monkeypatch.setattr(gpiozero.Device, "pin_factory", None)
    monkeypatch.setattr(gpiozero.Device, "_default_pin_factory", staticmethod(no_backend))
    gpio = next(c for c in run_checks(write_config(tmp_path, trigger={"enabled": True})) if c.name == "gpio")
    assert gpio.ok is False
    assert "python3-lgpio" in gpio.fix and "gpio group" in gpio.fix


def test_a_hanging_camera_times_out_and_the_rest_still_run(tmp_path, monkeypatch):
    import device.camera

    def hang(_config):
        time.sleep(5)
        raise AssertionError("unreachable in the test's time")

    monkeypatch.setattr(device.camera, "build_camera", hang)
    monkeypatch.setattr(doctor_module, "CAMERA_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    result = invoke("--config", str(write_config(tmp_path)))
    assert time.monotonic() - t0 < 4
    assert result.exit_code == 1
    found = rows(result.output)
    assert found["camera"].startswith("✗") and "no answer within" in found["camera"]
    assert "systemctl stop leukocam" in fix_after(result.output, "camera")
    assert found["bundle"].startswith("✓")


def test_a_check_that_raises_becomes_a_failed_check():
    def boom() -> Check:
        raise RuntimeError("driver exploded")

    check = run_guarded("camera", boom, 5)
    assert check.ok is False and "driver exploded" in check.detail and check.fix


def test_the_clock():
    assert check_clock(datetime(2020, 5, 1, tzinfo=UTC), lambda: True).ok is False
    assert "set the time" in check_clock(datetime(2020, 5, 1, tzinfo=UTC), lambda: True).fix
    assert check_clock(datetime(2025, 5, 1, tzinfo=UTC), lambda: True).ok is True
    assert check_clock(datetime(2025, 5, 1, tzinfo=UTC), lambda: False).ok is None
    unknown = check_clock(datetime(2025, 5, 1, tzinfo=UTC), lambda: None)
    assert unknown.ok is True and "unknown" in unknown.detail


def test_the_report_shows_fixes_only_for_what_is_not_fine():
    text = format_report(
        [
            Check("config", True, "fine", "never shown"),
            Check("camera", False, "no frame", "plug it in"),
            Check("gpio", None, "skipped"),
        ]
    )
    assert "never shown" not in text
    assert "fix: plug it in" in text
    assert text.splitlines()[0].startswith("✓ config")
    assert text.splitlines()[-1] == "1 passed, 1 failed, 1 skipped or warnings"


# --- picamera2: the installed version (apt's python3-picamera2, else the distribution) ---------------
FAKES = Path(__file__).resolve().parent / "fakes"


@pytest.fixture
def fake_picamera2_installed(tmp_path, monkeypatch):
    """The fake picamera2 importable, with distribution metadata of a chosen version; no apt package.

    Returns install(version): writes picamera2-<version>.dist-info where importlib.metadata finds it.
    """
    import sys

    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    monkeypatch.setattr(doctor_module, "dpkg_version", lambda package: None)

    def install(version: str) -> None:
        import picamera2

        picamera2.VERSION = version
        site = tmp_path / f"site-{version}"
        info = site / f"picamera2-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: picamera2\nVersion: {version}\n")
        monkeypatch.syspath_prepend(str(site))

    yield install
    sys.modules.pop("picamera2", None)


def picamera2_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, camera={"backend": "picamera2"})


def test_picamera2_new_enough_passes(tmp_path, fake_picamera2_installed):
    fake_picamera2_installed("0.3.30")
    result = invoke("--config", str(picamera2_config(tmp_path)))
    assert result.exit_code == 0, result.output
    found = rows(result.output)
    assert set(found) == set(ALL) | {"picamera2"}
    assert found["camera"].startswith("✓") and "picamera2" in found["camera"]  # one frame from the fake
    assert found["picamera2"].startswith("✓") and "0.3.30" in found["picamera2"]


def test_picamera2_older_than_0_3_20_fails_with_the_upgrade(tmp_path, fake_picamera2_installed):
    fake_picamera2_installed("0.3.19")
    result = invoke("--config", str(picamera2_config(tmp_path)))
    assert result.exit_code == 1
    found = rows(result.output)
    assert found["picamera2"].startswith("✗")
    assert "0.3.19 is older than 0.3.20" in found["picamera2"] and "timeout" in found["picamera2"]
    fix = fix_after(result.output, "picamera2")
    assert "apt install --only-upgrade python3-picamera2" in fix and "full-upgrade" in fix
    assert found["camera"].startswith("✓")  # the camera works; it only cannot time out


def test_picamera2_version_comes_from_apt_first(tmp_path, monkeypatch):
    """A dpkg-query on PATH that knows python3-picamera2 0.3.12-1 (an old Raspberry Pi OS)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "dpkg-query"
    tool.write_text(
        '#!/bin/sh\ncase "$*" in *python3-picamera2*) printf "installed 0.3.12-1";; *) exit 1;; esac\n',
        encoding="utf-8",
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    assert doctor_module.dpkg_version("python3-picamera2") == "0.3.12-1"
    assert doctor_module.dpkg_version("python3-other") is None
    assert doctor_module.picamera2_version() == ("0.3.12-1", "apt python3-picamera2")
    cfg = doctor_module.load_config(picamera2_config(tmp_path))
    check = doctor_module.check_picamera2(cfg)
    assert check.ok is False and "apt python3-picamera2 0.3.12-1" in check.detail


def test_picamera2_not_installed_fails(tmp_path, monkeypatch):
    cfg = doctor_module.load_config(picamera2_config(tmp_path))
    check = doctor_module.check_picamera2(cfg, find=lambda: None)
    assert check.ok is False and "apt install python3-picamera2" in check.fix


def test_picamera2_check_only_with_the_picamera2_backend(tmp_path):
    names = [c.name for c in run_checks(write_config(tmp_path))]
    assert "picamera2" not in names
    cfg = doctor_module.load_config(write_config(tmp_path))
    assert doctor_module.check_picamera2(cfg).ok is None


@pytest.mark.parametrize(
    ("version", "parsed"),
    [
        ("0.3.30-1", (0, 3, 30)),
        ("0.3.19-1~bpo12+1", (0, 3, 19)),
        ("1:0.3.20-2", (0, 3, 20)),
        ("0.3.30-1+leukocamfake", (0, 3, 30)),
        ("0.3.25", (0, 3, 25)),
        ("0.3.31+rpt1-1", (0, 3, 31)),
        ("weird", ()),
    ],
)
def test_upstream_version(version, parsed):
    assert doctor_module.upstream_version(version) == parsed
