"""`make pi-check` (firmware_config/pi-check.sh) and install.sh's picamera2 version check: the fast parts.

The emulated run itself (debootstrap, qemu-user-static, install.sh inside, tens of minutes) is a
release check outside `make test` (docs/pi.md, "Checked under emulation"). Here: the script is
clean shell, refuses what it must, and builds the local apt repository whose fake
python3-picamera2 stands in for the Raspberry Pi archive's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_firmware import need_tool

REPO = Path(__file__).resolve().parents[1]
FW = REPO / "firmware_config"
PI_CHECK = FW / "pi-check.sh"
INSTALL = FW / "install.sh"
FAKE = REPO / "tests" / "fakes" / "picamera2" / "__init__.py"


def fake_version() -> str:
    return re.search(r'^VERSION = "([0-9.]+)"$', FAKE.read_text(encoding="utf-8"), re.M).group(1)


def test_pi_check_passes_shellcheck():
    tool = need_tool("shellcheck", "shellcheck")
    result = subprocess.run([tool, "--shell=bash", str(PI_CHECK)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pi_check_help_and_bad_options():
    helped = subprocess.run(["bash", str(PI_CHECK), "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--rebuild" in helped.stdout and "qemu-L" in helped.stdout
    bad = subprocess.run(["bash", str(PI_CHECK), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    mode = subprocess.run(["bash", str(PI_CHECK), "--mode", "kvm"], capture_output=True, text=True, timeout=30)
    assert mode.returncode == 2 and "--mode" in mode.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="the refusal is for users other than root")
def test_pi_check_needs_root():
    result = subprocess.run(["bash", str(PI_CHECK)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "run as root" in result.stderr


def test_the_fake_apt_repository(tmp_path):
    """python3-picamera2 is the test fake at its VERSION, with metadata; python3-lgpio is empty; Packages indexes both."""
    need_tool("dpkg-deb", "dpkg")
    result = subprocess.run(
        ["bash", str(PI_CHECK), "--build-fake-repo", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    version = fake_version()
    debs = sorted(p.name for p in tmp_path.glob("*.deb"))
    assert debs == [
        "python3-lgpio_0.0.0-0+leukocamplaceholder_all.deb",
        f"python3-picamera2_{version}-1+leukocamfake_all.deb",
    ]
    index = (tmp_path / "Packages").read_text()
    stanzas = [s for s in index.split("\n\n") if s.strip()]
    assert len(stanzas) == 2
    for stanza, deb in zip(stanzas, debs, strict=True):
        assert f"Filename: ./{deb}" in stanza
        assert f"Size: {(tmp_path / deb).stat().st_size}" in stanza
        assert re.search(r"^SHA256: [0-9a-f]{64}$", stanza, re.M)
    assert "Depends: python3, python3-numpy, python3-pil" in index  # apt's numpy under the venv's, as on a Pi
    unpacked = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(tmp_path / debs[1]), str(unpacked)], check=True, timeout=60)
    site = unpacked / "usr" / "lib" / "python3" / "dist-packages"
    assert (site / "picamera2" / "__init__.py").read_bytes() == FAKE.read_bytes()
    assert f"Version: {version}" in (site / f"picamera2-{version}.dist-info" / "METADATA").read_text()


def test_the_packaged_fake_finds_its_scene_from_the_installed_device_package(tmp_path):
    """Installed under dist-packages, the fake is not beside the checkout: the scene comes from `device`."""
    site = tmp_path / "dist-packages"
    shutil.copytree(FAKE.parent, site / "picamera2")
    code = (
        "import picamera2\n"
        "cam = picamera2.Picamera2()\n"
        "cam.configure(cam.create_preview_configuration(main={'size': (64, 48), 'format': 'RGB888'}))\n"
        "cam.start()\n"
        "print(cam.capture_array('main').shape, cam.capture_metadata()['AeState'])\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(48,", "64,", "3)", "1"]  # AE still searching on the first frame


def run_install_with_dpkg(tmp_path: Path, answer: str) -> subprocess.CompletedProcess:
    """install.sh --dry-run with a dpkg-query on PATH that answers `answer` for python3-picamera2."""
    need_tool("dpkg", "dpkg")  # install.sh compares versions with dpkg --compare-versions
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "dpkg-query"
    tool.write_text(f'#!/bin/sh\nprintf "%s" "{answer}"\n', encoding="utf-8")
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(INSTALL), "--dry-run", "--prefix", str(tmp_path / "p"), "--no-start"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_install_says_what_to_do_about_an_old_picamera2(tmp_path):
    result = run_install_with_dpkg(tmp_path, "installed 0.3.19-1")
    assert result.returncode == 0, result.stderr
    assert "python3-picamera2 0.3.19-1 is older than 0.3.20" in result.stdout
    assert "sudo apt update && sudo apt full-upgrade" in result.stdout
    assert "leukocam doctor" in result.stdout


def test_install_accepts_a_new_picamera2(tmp_path):
    result = run_install_with_dpkg(tmp_path, "installed 0.3.30-1")
    assert result.returncode == 0, result.stderr
    assert "==> python3-picamera2 0.3.30-1 (0.3.20 or newer" in result.stdout
    assert "older than" not in result.stdout


def test_install_dry_run_before_picamera2_is_installed(tmp_path):
    result = run_install_with_dpkg(tmp_path, "not-installed ")
    assert result.returncode == 0, result.stderr
    assert "python3-picamera2 is not installed yet" in result.stdout


def test_make_has_the_pi_targets():
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^pi-check:", text, re.M) and "firmware_config/pi-check.sh" in text
    assert re.search(r"^pi-bench:", text, re.M) and "-m device.pi_bench" in text
    helped = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "make pi-check" in helped.stdout and "make pi-bench" in helped.stdout
