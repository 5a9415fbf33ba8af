"""The Pi bench (device/pi_bench.py): stage table, peak RSS and the Pi's budgets, within or over and by how much."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from device import pi_bench
from device.pi_bench import BUDGETS, budget_markdown, caveats, compare, pi_bench_command, report

REPO = Path(__file__).resolve().parents[1]


def result(total=4200.0, model=2500.0, rss=410.0, **over) -> dict:
    """A bench_pipeline result as `leukocam bench --only pipeline` writes it (bench.json)."""
    base = {
        "benchmark": "pipeline",
        "cpu": "Cortex-A72",
        "cores": 4,
        "field": [4056, 3040],
        "true_cells": 5,
        "found_cells": 5,
        "captures": 5,
        "median_ms": {
            "total": total,
            "capture": 900.0,
            "scale": 120.0,
            "find": 400.0,
            "qc": 60.0,
            "crop": 10.0,
            "classify": model,
            "cells": 190.0,
            "store": 30.0,
            "archive": 700.0,
            "scale_check": 500.0,
        },
        "model_ms": model,
        "model_share": model / total,
        "peak_rss_mb": rss,
        "after_frame_ms": total - 900.0,
        "after_frame_vs_model": (total - 900.0) / model,
        "runtime": "ai_edge_litert",
        "quantization": "int8",
        "input_size": 300,
        "bundle": "/var/lib/leukocam/bundles/current",
    }
    base.update(over)
    return base


RIG = {"machine": "aarch64", "board": "Raspberry Pi 4 Model B Rev 1.5", "os": "Debian GNU/Linux 12 (bookworm)"}


def test_budgets_match_the_docs():
    """docs/benchmarks.md states the budgets in words; the module holds the same numbers."""
    text = " ".join((REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8").split())
    section = text[text.index("## Benchmarks on the Pi") :]
    limits = {b.name: b.limit for b in BUDGETS}
    seconds = float(re.search(r"5 white cells under (\d+(?:\.\d+)?) s", section).group(1))
    share = float(re.search(r"pure model time under (\d+) %", section).group(1)) / 100
    rss = float(re.search(r"peak RSS of the service under (\d+) MB", section).group(1))
    assert limits["capture to result"] == seconds * 1000
    assert limits["pure model time"] == pytest.approx(share * seconds * 1000)
    assert limits["peak RSS"] == rss
    assert "4056×3040" in section and pi_bench.BUDGET_FIELD == (4056, 3040)


def test_within_budget_says_how_much_is_left():
    verdicts = {v.budget.name: v for v in compare(result())}
    assert all(v.within for v in verdicts.values())
    assert verdicts["capture to result"].margin == pytest.approx(5800.0)
    assert verdicts["capture to result"].text() == "within: 5.80 s (58%) to spare"
    assert verdicts["peak RSS"].text() == "within: 190 MB (32%) to spare"


def test_over_budget_says_by_how_much():
    verdicts = {v.budget.name: v for v in compare(result(total=12_500.0, model=7_000.0, rss=650.0))}
    assert not any(v.within for v in verdicts.values())
    assert verdicts["capture to result"].text() == "OVER by 2.50 s (25%)"
    assert verdicts["pure model time"].text() == "OVER by 1.00 s (17%)"
    assert verdicts["peak RSS"].text() == "OVER by 50 MB (8%)"
    md = budget_markdown(result(total=12_500.0, model=7_000.0, rss=650.0), machine="aarch64")
    assert md.count("OVER by") == 3 and "Compare with care" not in md


def test_the_report_has_the_stage_table_rss_and_rig():
    text = report(result(), rig_info=RIG, machine="aarch64")
    assert "Raspberry Pi 4 Model B Rev 1.5" in text
    assert "| classify | 2500.0 | 60% |" in text
    assert "| archive | 700.0 | after the result |" in text
    assert "Peak RSS of the appliance process: 410 MB" in text
    assert text.count("within:") == 3
    assert "Compare with care" not in text


def test_numbers_not_comparable_with_the_budgets_are_flagged():
    off = result(field=[1280, 960], found_cells=4, quantization="int16x8", input_size=96)
    notes = caveats(off, machine="x86_64")
    assert len(notes) == 4
    assert any("not on a Raspberry Pi" in n for n in notes)
    assert any("1280×960" in n for n in notes)
    assert any("4 of 5 cells" in n for n in notes)
    assert any("int16x8 at 96 px" in n for n in notes)
    assert "Compare with care" in budget_markdown(off, machine="x86_64")


def test_from_json_reads_a_bench_run_and_writes_the_report(tmp_path):
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps([{"benchmark": "finder"}, result(total=11_000.0)]))
    out = tmp_path / "out"
    run = CliRunner().invoke(pi_bench_command, ["--from-json", str(bench_json), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "OVER by 1.00 s (10%)" in run.output
    md = (out / "pi-bench.md").read_text()
    assert "### Capture to result, by stage" in md and "Against the Pi's budgets" in md
    saved = json.loads((out / "pi-bench.json").read_text())
    assert saved["budgets"]["capture to result"] == {"within": False, "margin": -1000.0}
    strict = CliRunner().invoke(pi_bench_command, ["--from-json", str(bench_json), "--out", str(out), "--strict"])
    assert strict.exit_code == 3


def test_from_json_without_a_pipeline_result_is_one_line(tmp_path):
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps([{"benchmark": "finder"}]))
    run = CliRunner().invoke(pi_bench_command, ["--from-json", str(bench_json), "--out", str(tmp_path)])
    assert run.exit_code == 1 and "no pipeline result" in run.output and "Traceback" not in run.output


@pytest.mark.slow
def test_quick_run_measures_without_tensorflow(tmp_path):
    """python -m device.pi_bench --quick, with TensorFlow and Keras unimportable (as on a Pi)."""
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from device.pi_bench import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocker, "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "pi-bench.md").read_text()
    assert "| total |" in text and "Peak RSS of the appliance process" in text
    assert "Compare with care" in text  # a quick run on the demo bundle is not the budgets' setting
