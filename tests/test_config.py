"""Tests for the device configuration (device/config.py) and how the CLI reports a bad one.

Configs are real TOML files in tmp_path; the CLI runs as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from device.config import (
    DEMO_BUNDLE,
    DEMO_FIELDS,
    CameraConfig,
    Config,
    load_config,
    parse_config,
)
from device.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FIRMWARE_TOML = REPO / "firmware_config" / "leukocam.toml"
SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "source"]


def _write(tmp_path: Path, text: str, name: str = "leukocam.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the defaults -----------------------------------------------------------------------------------


def test_embedded_default_uses_replay_camera_and_demo_bundle():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.source == "<embedded default>"
    assert cfg.camera.backend == "replay"
    assert cfg.bundle_path == DEMO_BUNDLE
    assert cfg.replay_dir == DEMO_FIELDS
    # the shipped demo bundle and fields live in the package (built by `leukocam demo-model`)
    assert DEMO_BUNDLE == REPO / "device" / "demo" / "bundle"
    assert DEMO_FIELDS == REPO / "device" / "demo" / "fields"
    assert cfg.service.startup_captures == 3
    cfg.validate()  # the default is valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.camera.backend = "opencv"  # type: ignore[misc]


def test_firmware_toml_loads_and_matches_the_dataclasses():
    raw = tomllib.loads(FIRMWARE_TOML.read_text(encoding="utf-8"))
    cfg = load_config(FIRMWARE_TOML)
    assert cfg.source == str(FIRMWARE_TOML)

    # every section in the file is a section of Config, and the other way round
    assert sorted(raw) == sorted(SECTIONS)
    for section, values in raw.items():
        obj = getattr(cfg, section)
        fields = {f.name for f in dataclasses.fields(obj)}
        # every key documented, no key that the code does not know
        assert set(values) == fields, f"[{section}] keys differ from {type(obj).__name__}"
        for key, value in values.items():
            assert getattr(obj, key) == value, f"{section}.{key}"
            assert type(getattr(obj, key)) is type(value), f"{section}.{key} type"


def test_firmware_toml_is_the_rig_profile():
    cfg = load_config(FIRMWARE_TOML)
    assert cfg.store.data_dir == "/var/lib/leukocam"
    assert cfg.service.startup_captures == 0
    assert cfg.model.bundle == "/var/lib/leukocam/bundles"  # the bundle store that `make deploy` fills
    assert cfg.camera.backend == "picamera2" and cfg.trigger.enabled
    # apart from those rig settings, the file documents the embedded defaults
    default = Config()
    for section in SECTIONS:
        got, want = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(default, section))
        differ = {k for k in got if got[k] != want[k]}
        assert differ <= {"data_dir", "startup_captures", "bundle", "backend", "enabled"}, (
            f"[{section}] differs in {differ}"
        )


def test_partial_file_keeps_defaults_and_int_becomes_float(tmp_path):
    cfg = load_config(_write(tmp_path, "[web]\nport = 9000\n[finder]\num_per_px = 1\n"))
    assert cfg.web.port == 9000
    assert cfg.web.host == "127.0.0.1" and cfg.model == Config().model
    assert cfg.finder.um_per_px == 1.0 and isinstance(cfg.finder.um_per_px, float)


def test_parse_config_on_an_empty_mapping_is_the_default():
    cfg = parse_config({}, source="test")
    assert cfg == dataclasses.replace(Config(), source="test")


# -- unknown keys -----------------------------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_the_allowed_keys(tmp_path):
    path = _write(tmp_path, 'colour = "blue"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:")
    assert "unknown key colour" in msg and "top level" in msg
    assert "allowed keys: " + ", ".join(sorted(SECTIONS)) in msg


def test_unknown_key_in_a_section_names_it_and_the_allowed_keys(tmp_path):
    path = _write(tmp_path, '[camera]\nbackend = "replay"\nexposure = 10\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "unknown key camera.exposure in [camera]" in msg
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(CameraConfig)))
    assert f"allowed keys: {allowed}" in msg


def test_source_is_not_a_settable_key():
    with pytest.raises(ConfigError, match="unknown key source"):
        parse_config({"source": "x"})


# -- wrong types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "expected", "got"),
    [
        ('[web]\nport = "8080"\n', "web.port", "int", "str"),
        ("[web]\nport = true\n", "web.port", "int", "bool"),
        ("[model]\nthreads = 2.5\n", "model.threads", "int", "float"),
        ("[quality]\nmin_focus = false\n", "quality.min_focus", "float", "bool"),
        ('[quality]\nmin_focus = "4"\n', "quality.min_focus", "float", "str"),
        ("[camera]\nopencv_device = 0\n", "camera.opencv_device", "str", "int"),
        ('[model]\nself_test = "yes"\n', "model.self_test", "bool", "str"),
        ("camera = 3\n", "camera", "a [camera] table", "int"),
    ],
)
def test_wrong_type_names_the_key_and_expected_type(tmp_path, toml, key, expected, got):
    path = _write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}")
    assert f"expected {expected}" in msg
    assert f"got {got}" in msg


# -- out of range -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "hint"),
    [
        ({"web": {"port": 70000}}, "web.port", "between 1 and 65535"),
        ({"web": {"port": -1}}, "web.port", "between 1 and 65535"),
        ({"web": {"threads": 0}}, "web.threads", ">= 1"),
        ({"model": {"threads": 0}}, "model.threads", ">= 1"),
        ({"camera": {"backend": "foo"}}, "camera.backend", "one of replay, opencv"),
        ({"camera": {"retries": -1}}, "camera.retries", ">= 0"),
        ({"quality": {"max_clipped_fraction": 1.5}}, "quality.max_clipped_fraction", "between 0.0 and 1.0"),
        ({"finder": {"max_cells": 0}}, "finder.max_cells", ">= 1"),
        ({"store": {"max_image_pixels": 0}}, "store.max_image_pixels", "between 1 and 89000000"),
        ({"service": {"startup_captures": -2}}, "service.startup_captures", ">= 0"),
    ],
)
def test_out_of_range_names_the_key(data, key, hint):
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="rig.toml")
    msg = str(info.value)
    assert msg.startswith(f"rig.toml: {key} = ")
    assert hint in msg


def test_boundary_values_are_accepted():
    cfg = parse_config(
        {
            "web": {"port": 65535, "threads": 1},
            "camera": {"retries": 0, "backend": "opencv"},
            "quality": {"max_clipped_fraction": 1.0},
            "store": {"min_free_mb": 0},
        }
    )
    assert (cfg.web.port, cfg.web.threads, cfg.camera.retries) == (65535, 1, 0)
    assert cfg.camera.backend == "opencv"


# -- file problems ----------------------------------------------------------------------------------


def test_invalid_toml_mentions_toml(tmp_path):
    path = _write(tmp_path, "[web\nport = 8080\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "line 1" in str(info.value)


def test_missing_file_says_not_found(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert "--config" in str(info.value)


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


# -- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[web]\nport = 70000\n", "web.port"),
        ("[camera]\nexposure = 10\n", "camera.exposure"),
        ("[web\n", "not valid TOML"),
    ],
)
def test_cli_reports_a_bad_config_in_one_line(tmp_path, toml, needle):
    bad = _write(tmp_path, toml, "bad.toml")
    proc = subprocess.run(
        [sys.executable, "-m", "device.cli", "capture", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0] and str(bad) in errors[0]
    assert proc.stdout == ""


def test_cli_reports_a_missing_config(tmp_path):
    missing = tmp_path / "missing.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "device.cli", "capture", "--config", str(missing)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "not found" in proc.stderr
