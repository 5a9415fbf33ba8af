"""The Pi bench: the capture pipeline's stage table and peak RSS, against the Pi's budgets.

A Pi owner runs, with the service stopped::

    cd /tmp && sudo -u leukocam /opt/leukocam/.venv/bin/python -m device.pi_bench \\
        --bundle /var/lib/leukocam/bundles/current --out /tmp/pi-bench

It runs `leukocam bench --only pipeline` (convert.bench.bench_pipeline: a 4056x3040
synthetic field with 5 white cells on the replay camera, capture to stored result by stage,
in a child process whose peak RSS is measured), or reads the bench.json such a run wrote
(--from-json), and prints:

- the rig (board, OS, CPU, memory, Python, runtime, picamera2);
- the per-stage table, each stage's share of the total;
- each Pi budget (docs/benchmarks.md, "Benchmarks on the Pi": Pi 4, int8 300 px bundle,
  4056x3040 field with 5 cells): within or over, and by how much.

pi-bench.md is what to paste into a bug report (README, "Setting up the Raspberry Pi").
No TensorFlow: the benchmark needs only the [device] extra.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import click

BUDGET_FIELD = (4056, 3040)
"""The field the budgets are for (the HQ camera's full resolution)."""
BUDGET_CELLS = 5
BUDGET_INPUT_SIZE = 300
BUDGET_QUANTIZATION = "int8"
BUDGET_BOARD = "Raspberry Pi 4 (4 GB)"


@dataclasses.dataclass(frozen=True)
class Budget:
    name: str
    limit: float
    unit: str
    what: str


BUDGETS = (
    Budget("capture to result", 10_000.0, "ms", "capture to stored result, wall clock"),
    Budget("pure model time", 6_000.0, "ms", "the bundle alone on the same crops: under 60 % of the 10 s budget"),
    Budget("peak RSS", 600.0, "MB", "the appliance process; a 2 GB Pi keeps room for libcamera's buffers"),
)
"""docs/benchmarks.md, "Benchmarks on the Pi" (tests/test_pi_bench.py keeps the two in step)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    budget: Budget
    measured: float

    @property
    def within(self) -> bool:
        return self.measured <= self.budget.limit

    @property
    def margin(self) -> float:
        """Budget minus measured: positive to spare, negative over."""
        return self.budget.limit - self.measured

    def text(self) -> str:
        amount = _amount(abs(self.margin), self.budget.unit)
        share = abs(self.margin) / self.budget.limit
        if self.within:
            return f"within: {amount} ({share:.0%}) to spare"
        return f"OVER by {amount} ({share:.0%})"


def _amount(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"
    return f"{value:.0f} {unit}"


def measured(result: dict) -> dict[str, float]:
    """What the budgets look at, from a bench_pipeline result."""
    return {
        "capture to result": float(result["median_ms"]["total"]),
        "pure model time": float(result["model_ms"]),
        "peak RSS": float(result["peak_rss_mb"]),
    }


def compare(result: dict) -> list[Verdict]:
    values = measured(result)
    return [Verdict(b, values[b.name]) for b in BUDGETS]


def caveats(result: dict, machine: str | None = None) -> list[str]:
    """Why this run's numbers may not be comparable with the budgets."""
    notes = []
    machine = machine or platform.machine()
    if machine != "aarch64":
        notes.append(f"measured on {machine}, not on a Raspberry Pi: the budgets are for a {BUDGET_BOARD}")
    field = tuple(result.get("field") or ())
    if field != BUDGET_FIELD:
        notes.append(f"the field was {field[0]}×{field[1]}, the budgets are for {BUDGET_FIELD[0]}×{BUDGET_FIELD[1]}")
    if result.get("true_cells") != BUDGET_CELLS or result.get("found_cells") != result.get("true_cells"):
        notes.append(
            f"{result.get('found_cells')} of {result.get('true_cells')} cells found; the budgets are for "
            f"{BUDGET_CELLS} of {BUDGET_CELLS}"
        )
    if result.get("quantization") != BUDGET_QUANTIZATION or result.get("input_size") != BUDGET_INPUT_SIZE:
        notes.append(
            f"the bundle is {result.get('quantization')} at {result.get('input_size')} px; the budgets are for "
            f"{BUDGET_QUANTIZATION} at {BUDGET_INPUT_SIZE} px (the shipped demo bundle is a small SYNTHETIC one)"
        )
    return notes


def stage_table(result: dict) -> str:
    med = result["median_ms"]
    total = float(med["total"]) or 1.0
    lines = ["| stage | ms | share of total |", "| --- | --- | --- |"]
    for stage, ms in med.items():
        after = stage in ("archive", "scale_check")  # they follow the stored result
        share = "after the result" if after else f"{float(ms) / total:.0%}"
        lines.append(f"| {stage} | {float(ms):.1f} | {share} |")
    return "\n".join(lines)


def budget_markdown(result: dict, machine: str | None = None) -> str:
    """The budget table for one bench_pipeline result (what `leukocam bench --only pipeline` can append)."""
    lines = [
        f"#### Against the Pi's budgets ({BUDGET_BOARD}, {BUDGET_QUANTIZATION} {BUDGET_INPUT_SIZE} px bundle, "
        f"{BUDGET_FIELD[0]}×{BUDGET_FIELD[1]} field with {BUDGET_CELLS} cells; docs/benchmarks.md)",
        "",
        "| budget | measured | limit | verdict | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v in compare(result):
        lines.append(
            f"| {v.budget.name} | {_amount(v.measured, v.budget.unit)} | {_amount(v.budget.limit, v.budget.unit)} | "
            f"{v.text()} | {v.budget.what} |"
        )
    share = result.get("model_share")
    if share is not None:
        lines += ["", f"Pure model time is {share:.0%} of this run's capture-to-result time."]
    notes = caveats(result, machine)
    if notes:
        lines += ["", "Compare with care: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def rig() -> dict[str, str]:
    """What a bug report needs to know about the machine, read without importing TensorFlow or picamera2."""
    info = {"machine": platform.machine(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        info["board"] = Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        info["board"] = "unknown (no /proc/device-tree/model: not a Raspberry Pi?)"
    try:
        release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        info["os"] = release.get("PRETTY_NAME", "").strip('"')
    except OSError:
        info["os"] = "unknown"
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory"] = f"{int(meminfo[meminfo.index('MemTotal:') + 1]) / 1024**2:.1f} GB"
    except (OSError, ValueError, IndexError):
        info["memory"] = "unknown"
    try:
        from device.doctor import picamera2_version

        found = picamera2_version()
        info["picamera2"] = f"{found[1]} {found[0]}" if found else "not installed"
    except Exception as exc:  # a report must still come out
        info["picamera2"] = f"unknown ({exc})"
    try:
        import importlib.metadata

        info["leukocam"] = importlib.metadata.version("leukocam")
    except Exception:
        info["leukocam"] = "unknown"
    return info


def report(result: dict, rig_info: dict[str, str] | None = None, machine: str | None = None) -> str:
    """The whole Pi bench report, markdown: what to paste into a bug report."""
    rig_info = rig() if rig_info is None else rig_info
    lines = ["## LeukoCam Pi bench", ""]
    lines += [f"- {k}: {v}" for k, v in rig_info.items()]
    lines += [
        f"- cpu: {result.get('cpu')} ({result.get('cores')} cores)",
        f"- bundle: {result.get('bundle')} ({result.get('quantization')}, {result.get('input_size')} px, "
        f"{result.get('runtime')})",
        f"- field: {result['field'][0]}×{result['field'][1]}, {result.get('found_cells')} of "
        f"{result.get('true_cells')} cells found, median of {result.get('captures')} captures",
        "",
        "### Capture to result, by stage",
        "",
        stage_table(result),
        "",
        f"Peak RSS of the appliance process: {float(result['peak_rss_mb']):.0f} MB. Pure model time on the "
        f"same crops: {float(result['model_ms']):.1f} ms.",
        "",
        budget_markdown(result, machine),
    ]
    return "\n".join(lines)


def load_pipeline_result(path: str | Path) -> dict:
    """The pipeline result in a bench.json from `leukocam bench` (a list of results), or a single result."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    candidates = data if isinstance(data, list) else [data]
    for item in candidates:
        if isinstance(item, dict) and item.get("benchmark") == "pipeline":
            return item
    raise click.ClickException(f"{path}: no pipeline result (run `leukocam bench --only pipeline` first)")


def run_pipeline_bench(bundle: str | Path, quick: bool = False) -> dict:
    """`leukocam bench --only pipeline`'s measurement (convert.bench; no TensorFlow)."""
    from convert.bench import bench_pipeline

    w, h, n = (1280, 960, 2) if quick else (*BUDGET_FIELD, 11)
    return bench_pipeline(bundle, width=w, height=h, cells=BUDGET_CELLS, captures=n)


@click.command("pi-bench")
@click.option(
    "--bundle",
    "bundle_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Bundle to benchmark (default: the shipped SYNTHETIC demo bundle; on a rig, "
    "/var/lib/leukocam/bundles/current).",
)
@click.option(
    "--from-json",
    "from_json",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Compare the bench.json of an earlier `leukocam bench --only pipeline` run instead of measuring.",
)
@click.option("--out", "out_dir", default="pi-bench", show_default=True, help="Folder for pi-bench.md and .json.")
@click.option("--quick", is_flag=True, help="A 1280×960 field and 2 captures: checks that it runs, not the budgets.")
@click.option("--strict", is_flag=True, help="Exit with status 3 when a budget is exceeded.")
def pi_bench_command(bundle_dir, from_json, out_dir, quick, strict):
    """The pipeline's stage table and peak RSS against the Pi's budgets; pi-bench.md goes with a bug report."""
    if from_json:
        result = load_pipeline_result(from_json)
    else:
        from device.config import DEMO_BUNDLE

        bundle = bundle_dir or DEMO_BUNDLE
        click.echo(f"benchmarking the capture pipeline with {bundle} (a few minutes on a Pi) ...", err=True)
        result = run_pipeline_bench(bundle, quick=quick)
    text = report(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pi-bench.md").write_text(text, encoding="utf-8")
    verdicts = {v.budget.name: {"within": v.within, "margin": v.margin} for v in compare(result)}
    (out / "pi-bench.json").write_text(json.dumps({"result": result, "budgets": verdicts}, indent=2), encoding="utf-8")
    click.echo(text)
    click.echo(f"written to {out / 'pi-bench.md'}: attach it to a bug report", err=True)
    if strict and not all(v.within for v in compare(result)):
        sys.exit(3)


def main(argv: list[str] | None = None) -> None:
    pi_bench_command.main(args=argv, prog_name=f"{os.path.basename(sys.executable)} -m device.pi_bench")


if __name__ == "__main__":
    main()
