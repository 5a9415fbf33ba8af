"""The CLI: one entry point, lazy workstation commands, clean errors."""

from __future__ import annotations

from click.testing import CliRunner

from device.cli import LAZY_COMMANDS, cli


def test_help_lists_device_and_workstation_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("serve", "capture", "check-bundle", *LAZY_COMMANDS):
        assert name in result.output


def test_check_bundle_on_the_shipped_bundle(demo_bundle_dir):
    result = CliRunner().invoke(cli, ["check-bundle", str(demo_bundle_dir)])
    assert result.exit_code == 0, result.output
    assert "self-test passed" in result.output


def test_bad_bundle_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["check-bundle", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "model.json" in result.output
    assert "Traceback" not in result.output


def test_synth_cells_writes_labelled_synthetic_data(tmp_path):
    result = CliRunner().invoke(
        cli, ["synth", "cells", str(tmp_path / "c"), "--subjects", "2", "--cells-per-subject", "2", "--size", "48"]
    )
    assert result.exit_code == 0, result.output
    assert '"synthetic": true' in result.output
    assert len(list((tmp_path / "c").rglob("*.bmp"))) == 4
    assert "SYNTHETIC" in (tmp_path / "c" / "SYNTHETIC_README.txt").read_text()
