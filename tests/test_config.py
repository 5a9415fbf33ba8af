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
        ({"web": {"threads": 0}}, "web.threads", "between 1 and 256"),
        ({"model": {"threads": 0}}, "model.threads", "between 1 and 64"),
        ({"camera": {"backend": "foo"}}, "camera.backend", "one of replay, opencv"),
        ({"camera": {"retries": -1}}, "camera.retries", "between 0 and 100"),
        ({"quality": {"max_clipped_fraction": 1.5}}, "quality.max_clipped_fraction", "between 0.0 and 1.0"),
        ({"finder": {"max_cells": 0}}, "finder.max_cells", "between 1 and 10000"),
        ({"store": {"max_image_pixels": 0}}, "store.max_image_pixels", "between 1 and 89000000"),
        ({"service": {"startup_captures": -2}}, "service.startup_captures", "between 0 and 1000"),
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


# -- holes every key of a type shares (issue #12) ---------------------------------------------------


def _keys_of(kind: type) -> list[tuple[str, str]]:
    import typing

    return [
        (section, f.name)
        for section in SECTIONS
        for f in dataclasses.fields(getattr(Config(), section))
        if typing.get_type_hints(type(getattr(Config(), section)))[f.name] is kind
    ]


@pytest.mark.parametrize(("section", "key"), _keys_of(float))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_nan_and_inf(tmp_path, section, key, bad):
    path = _write(tmp_path, f"[{section}]\n{key} = {bad}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {section}.{key} = ")
    assert "expected a finite number" in str(info.value)


@pytest.mark.parametrize(("section", "key"), _keys_of(int))
def test_every_int_key_has_an_upper_bound(section, key):
    with pytest.raises(ConfigError, match=rf"^rig\.toml: {section}\.{key} = 9223372036854775807: expected a value "):
        parse_config({section: {key: 2**63 - 1}}, source="rig.toml")


@pytest.mark.parametrize(("section", "key"), _keys_of(str))
def test_every_str_key_refuses_nul(section, key):
    with pytest.raises(ConfigError, match=rf"^rig\.toml: {section}\.{key} = .*without NUL"):
        parse_config({section: {key: "a\0b"}}, source="rig.toml")


def test_nan_set_in_code_is_refused_too():
    cfg = Config()
    bad = dataclasses.replace(cfg, quality=dataclasses.replace(cfg.quality, min_focus=float("nan")))
    with pytest.raises(ConfigError, match="quality.min_focus = nan"):
        bad.validate()


@pytest.mark.parametrize(
    ("data", "key", "hint"),
    [
        ({"model": {"threads": 10**9}}, "model.threads", "between 1 and 64"),
        ({"model": {"threads": 65}}, "model.threads", "between 1 and 64"),
        ({"web": {"threads": 10**6}}, "web.threads", "between 1 and 256"),
        ({"web": {"max_upload_mb": 10**6}}, "web.max_upload_mb", "between 1 and 1024"),
        ({"camera": {"retries": 10**6}}, "camera.retries", "between 0 and 100"),
        ({"service": {"startup_captures": 10**6}}, "service.startup_captures", "between 0 and 1000"),
        ({"finder": {"max_cells": 10**6}}, "finder.max_cells", "between 1 and 10000"),
        ({"store": {"min_free_mb": 10**13}}, "store.min_free_mb", "between 0 and 1000000000000"),
    ],
)
def test_huge_values_name_the_key_and_the_range(data, key, hint):
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="rig.toml")
    assert str(info.value).startswith(f"rig.toml: {key} = ") and hint in str(info.value)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0.0.0.0", "::1", "[::1]", "::", "localhost", "leukocam.local", "pi-4.lab.example.org"]
)
def test_hosts_that_are_accepted(host):
    assert parse_config({"web": {"host": host}}).web.host == host


@pytest.mark.parametrize(
    "host",
    ["999.1.1.1", "256.0.0.1", "1.2.3", "", " 127.0.0.1", "lab pc", "-pi.local", "a..b", "pi_4", "::g", "x" * 64],
)
def test_hosts_that_are_refused(host):
    with pytest.raises(ConfigError, match=r"^rig\.toml: web\.host = .*expected an IP address or a host name"):
        parse_config({"web": {"host": host}}, source="rig.toml")


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        (bytes(range(256)), "not a text file"),
        ("[web]\nport = 9000\n".encode("utf-16"), "UTF-16"),
        ('[camera]\nreplay_dir = "Präparate"\n'.encode("latin-1"), "not UTF-8 text (byte 0xe4"),
    ],
    ids=["binary", "utf16", "latin1"],
)
def test_a_file_that_is_not_utf8_says_save_as_utf8(tmp_path, raw, hint):
    path = tmp_path / "leukocam.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and hint in str(info.value)
    assert str(info.value).endswith("save it as UTF-8 TOML")


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "leukocam.toml"
    path.write_bytes("[web]\nport = 9000\n".encode("utf-8-sig"))
    assert load_config(path).web.port == 9000


def test_a_huge_file_is_refused_unread(tmp_path):
    path = _write(tmp_path, "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MB"):
        load_config(path)


# -- [slides] (issue #13) ----------------------------------------------------------------------------


def test_slides_defaults_and_firmware_values():
    assert (Config().slides.target_cells, Config().slides.decision_threshold) == (200, 0.20)
    cfg = parse_config({"slides": {"target_cells": 500, "decision_threshold": 0.05}})
    assert (cfg.slides.target_cells, cfg.slides.decision_threshold) == (500, 0.05)
    boundary = parse_config({"slides": {"target_cells": 10}}), parse_config({"slides": {"target_cells": 10_000}})
    assert [c.slides.target_cells for c in boundary] == [10, 10_000]


@pytest.mark.parametrize(
    ("data", "key", "hint"),
    [
        ({"target_cells": 9}, "slides.target_cells", "between 10 and 10000"),
        ({"target_cells": 10_001}, "slides.target_cells", "between 10 and 10000"),
        ({"target_cells": 200.0}, "slides.target_cells", "expected int, got float"),
        ({"target_cells": True}, "slides.target_cells", "expected int, got bool"),
        ({"decision_threshold": 0}, "slides.decision_threshold", "between 0 and 1, both excluded"),
        ({"decision_threshold": 1.0}, "slides.decision_threshold", "between 0 and 1, both excluded"),
        ({"decision_threshold": -0.2}, "slides.decision_threshold", "between 0 and 1, both excluded"),
        ({"decision_threshold": 20}, "slides.decision_threshold", "between 0 and 1, both excluded"),
        ({"decision_threshold": "0.2"}, "slides.decision_threshold", "expected float, got str"),
        ({"threshold": 0.2}, "slides.threshold", "allowed keys: decision_threshold, target_cells"),
    ],
)
def test_slides_values_are_validated(data, key, hint):
    with pytest.raises(ConfigError) as info:
        parse_config({"slides": data}, source="rig.toml")
    assert str(info.value).startswith("rig.toml: ") and key in str(info.value) and hint in str(info.value)


def test_slides_threshold_set_in_code_is_validated_too():
    cfg = Config()
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="slides.decision_threshold"):
            dataclasses.replace(cfg, slides=dataclasses.replace(cfg.slides, decision_threshold=bad)).validate()


# -- which config file (issue #13) -------------------------------------------------------------------


@pytest.fixture
def no_discovery(monkeypatch, tmp_path):
    """Neither $LEUKOCAM_CONFIG nor a system config: each test adds the ones it needs."""
    import device.config

    monkeypatch.delenv("LEUKOCAM_CONFIG", raising=False)
    monkeypatch.setattr(device.config, "SYSTEM_CONFIG", tmp_path / "etc" / "leukocam.toml")
    return device.config


def test_discovery_order_is_flag_then_env_then_system_then_default(no_discovery, monkeypatch, tmp_path):
    from device.config import resolve_config_path

    flag, env = _write(tmp_path, "", "flag.toml"), _write(tmp_path, "", "env.toml")
    system = no_discovery.SYSTEM_CONFIG
    assert resolve_config_path(None) == (None, "no --config, $LEUKOCAM_CONFIG or " + str(system))
    system.parent.mkdir()
    system.write_text("[web]\nport = 9001\n")
    assert resolve_config_path(None) == (system, "the installed system config")
    monkeypatch.setenv("LEUKOCAM_CONFIG", str(env))
    assert resolve_config_path(None) == (env, "$LEUKOCAM_CONFIG")
    assert resolve_config_path(str(flag)) == (flag, "--config")
    monkeypatch.setenv("LEUKOCAM_CONFIG", "  ")  # blank is unset
    assert resolve_config_path(None)[0] == system


def test_discover_config_loads_the_file_and_says_how(no_discovery, monkeypatch, tmp_path):
    from device.config import discover_config

    assert discover_config(None)[0] == Config()
    env = _write(tmp_path, "[web]\nport = 9002\n", "env.toml")
    monkeypatch.setenv("LEUKOCAM_CONFIG", str(env))
    cfg, how = discover_config(None)
    assert (cfg.web.port, cfg.source, how) == (9002, str(env), "$LEUKOCAM_CONFIG")
    monkeypatch.setenv("LEUKOCAM_CONFIG", str(tmp_path / "typo.toml"))  # named, so never skipped
    with pytest.raises(ConfigError, match=r"typo\.toml: config file not found \(named by \$LEUKOCAM_CONFIG\)"):
        discover_config(None)


def test_command_hints_name_the_config_file(tmp_path, monkeypatch):
    assert Config().command("set-password", "USER") == "leukocam set-password USER"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path, "", "my rig.toml").name)  # relative, with a space
    assert cfg.command("set-password", "USER") == f"leukocam set-password --config '{tmp_path / 'my rig.toml'}' USER"
