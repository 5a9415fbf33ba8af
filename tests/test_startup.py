"""`leukocam serve` on a broken config or bundle stops with one `error:` line and exit code 2 (issue #12).

Each case must fail at validation time, before the data store is opened or the model is loaded, so
these start-ups take milliseconds. Most run in-process with click's CliRunner; a few run the real CLI
as a subprocess to check what an operator sees on stderr (no log lines, no traceback).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device.cli import cli
from device.config import DEMO_BUNDLE

REPO = Path(__file__).resolve().parents[1]
UTF8_HINT = "save it as UTF-8 TOML"


def _base_toml(tmp_path: Path) -> str:
    # The store goes to tmp_path; a test checks it was never created.
    return f"[store]\ndata_dir = {json.dumps(str(tmp_path / 'store'))}\n[service]\nstartup_captures = 0\n"


def _config(tmp_path: Path, body: str | bytes) -> Path:
    path = tmp_path / "leukocam.toml"
    path.write_bytes(body if isinstance(body, bytes) else (_base_toml(tmp_path) + body).encode("utf-8"))
    return path


def _bundle(tmp_path: Path, edit=None, golden=None, golden_sha: bool = True) -> Path:
    """A copy of the shipped demo bundle with model.json edited and/or golden.npz replaced.

    model.json is not hashed inside a bundle (only model.tflite and golden.npz are, from model.json),
    so an edited field reaches the field check. A replaced golden.npz gets its sha256 written into
    model.json the way convert.bundle_writer does, so the test reaches the file's own check.
    """
    dst = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, dst)
    meta = json.loads((dst / "model.json").read_text(encoding="utf-8"))
    if golden is not None:
        golden = golden()  # built lazily: collecting the tests reads no bundle
        (dst / "golden.npz").write_bytes(golden)
        if golden_sha:
            meta["golden"]["sha256"] = hashlib.sha256(golden).hexdigest()
    if edit is not None:
        edit(meta)
    (dst / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    return dst


def _bundle_config(tmp_path: Path, **kw) -> Path:
    return _config(tmp_path, f"[model]\nbundle = {json.dumps(str(_bundle(tmp_path, **kw)))}\n")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _golden_arrays() -> dict:
    with np.load(DEMO_BUNDLE / "golden.npz") as npz:
        return dict(npz)


def _truncated_golden() -> bytes:
    data = (DEMO_BUNDLE / "golden.npz").read_bytes()
    return data[: len(data) // 2]


def _set(key, value):
    return lambda m: m.update({key: value})


# (id, make the config file from tmp_path, what the one error line must contain)
CONFIG_CASES = [
    ("binary", lambda t: _config(t, bytes(range(256)) * 4), [UTF8_HINT]),
    ("utf16", lambda t: _config(t, _base_toml(t).encode("utf-16")), ["UTF-16", UTF8_HINT]),
    ("utf16-no-bom", lambda t: _config(t, _base_toml(t).encode("utf-16-le")), [UTF8_HINT]),
    ("latin1", lambda t: _config(t, '[camera]\nreplay_dir = "Präparate"\n'.encode("latin-1")), [UTF8_HINT]),
    ("host-bad-ipv4", lambda t: _config(t, '[web]\nhost = "999.1.1.1"\n'), ["web.host", "'999.1.1.1'", "IP address"]),
    ("host-not-a-name", lambda t: _config(t, '[web]\nhost = "lab pc"\n'), ["web.host", "host name"]),
    ("host-empty", lambda t: _config(t, '[web]\nhost = ""\n'), ["web.host", "IP address"]),
    ("threads-1e9", lambda t: _config(t, "[model]\nthreads = 1000000000\n"), ["model.threads", "between 1 and 64"]),
    ("threads-2**63", lambda t: _config(t, f"[model]\nthreads = {2**63}\n"), ["model.threads", "between 1 and 64"]),
    ("threads-int64", lambda t: _config(t, f"[model]\nthreads = {2**63 - 1}\n"), ["model.threads", "between 1"]),
    ("web-threads", lambda t: _config(t, f"[web]\nthreads = {2**40}\n"), ["web.threads", "between 1 and"]),
    ("web-upload", lambda t: _config(t, f"[web]\nmax_upload_mb = {2**40}\n"), ["web.max_upload_mb", "between"]),
    ("retries", lambda t: _config(t, f"[camera]\nretries = {2**40}\n"), ["camera.retries", "between 0 and"]),
    ("max-cells", lambda t: _config(t, f"[finder]\nmax_cells = {2**40}\n"), ["finder.max_cells", "between 1 and"]),
    (
        "min-free",
        lambda t: _config(t, _base_toml(t).replace("[store]\n", f"[store]\nmin_free_mb = {2**60}\n").encode()),
        ["store.min_free_mb", "between"],
    ),
    ("min-focus-nan", lambda t: _config(t, "[quality]\nmin_focus = nan\n"), ["quality.min_focus", "finite"]),
    ("min-focus-inf", lambda t: _config(t, "[quality]\nmin_focus = inf\n"), ["quality.min_focus", "finite"]),
    ("um-per-px-nan", lambda t: _config(t, "[finder]\num_per_px = -nan\n"), ["finder.um_per_px", "finite"]),
    ("nul-in-path", lambda t: _config(t, '[model]\nbundle = "/opt/a\\u0000b"\n'), ["model.bundle", "NUL"]),
    ("threshold-in-config", lambda t: _config(t, "[model]\nthreshold = 0.5\n"), ["unknown key model.threshold"]),
    ("review-band-in-config", lambda t: _config(t, "[model]\nreview_band = [0.3, 0.7]\n"), ["model.review_band"]),
]

# (id, keyword arguments for _bundle, what the one error line must contain)
BUNDLE_CASES = [
    ("threshold-string", {"edit": _set("threshold", "0.5")}, ["threshold", "a number in 0..1", "'0.5'"]),
    ("threshold-null", {"edit": _set("threshold", None)}, ["threshold", "a number in 0..1", "None"]),
    ("threshold-three", {"edit": _set("threshold", [0.1, 0.5, 0.9])}, ["threshold", "a number in 0..1"]),
    ("threshold-above-1", {"edit": _set("threshold", 1.5)}, ["threshold", "a number in 0..1", "1.5"]),
    ("threshold-nan", {"edit": _set("threshold", float("nan"))}, ["threshold", "a number in 0..1", "nan"]),
    ("band-string", {"edit": _set("review_band", "0.3,0.7")}, ["review_band", "[low, high]"]),
    ("band-null", {"edit": _set("review_band", None)}, ["review_band", "[low, high]"]),
    ("band-three", {"edit": _set("review_band", [0.1, 0.5, 0.9])}, ["review_band", "[low, high]"]),
    ("band-reversed", {"edit": _set("review_band", [0.7, 0.3])}, ["review_band", "low <= high"]),
    ("band-above-1", {"edit": _set("review_band", [0.3, 2])}, ["review_band", "<= 1"]),
    (
        "band-misses-threshold",
        {"edit": lambda m: m.update(threshold=0.5, review_band=[0.6, 0.9])},
        ["review_band", "contain threshold 0.5"],
    ),
    ("golden-list", {"edit": _set("golden", [1, 2])}, ["golden must be a JSON object", "a list"]),
    ("golden-tolerance-inf", {"edit": lambda m: m["golden"].update(tolerance=float("inf"))}, ["golden.tolerance"]),
    ("quantization-string", {"edit": _set("quantization", "int8")}, ["quantization must be a JSON object"]),
    ("quantization-mode-null", {"edit": lambda m: m["quantization"].update(mode=None)}, ["quantization.mode"]),
    ("golden-not-a-zip", {"golden": lambda: b"not a golden file"}, ["golden.npz", "not a .npz archive"]),
    ("golden-truncated", {"golden": _truncated_golden}, ["golden.npz", "not a .npz archive"]),
    ("golden-bad-sha", {"golden": lambda: b"PK\x03\x04" * 64, "golden_sha": False}, ["golden.npz: sha256 does not"]),
    (
        "golden-no-crops",
        {"golden": lambda: _npz(probabilities=np.zeros(8, np.float32))},
        ["golden.npz", "unreadable golden file"],
    ),
    (
        "golden-wrong-probabilities",
        {"golden": lambda: _npz(**{**_golden_arrays(), "probabilities": np.zeros(3, np.float32)})},
        ["golden.npz", "golden probabilities", "expected 8 finite floats"],
    ),
]


def _check(stderr: str, stdout: str, needles: list[str], where: Path | None) -> None:
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert where is None or str(where) in line, line
    for needle in needles:
        assert needle in line, line
    assert stdout == ""


def _serve(config: Path, *extra: str):
    result = CliRunner().invoke(cli, ["serve", "--config", str(config), *extra])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize(("make", "needles"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_broken_config_is_one_line(tmp_path, make, needles):
    path = make(tmp_path)
    result = _serve(path)
    _check(result.stderr, result.stdout, needles, path)
    assert not (tmp_path / "store").exists(), "nothing may start before the config is valid"


@pytest.mark.parametrize(("kw", "needles"), [c[1:] for c in BUNDLE_CASES], ids=[c[0] for c in BUNDLE_CASES])
def test_broken_bundle_is_one_line(tmp_path, kw, needles):
    path = _bundle_config(tmp_path, **kw)
    result = _serve(path)
    _check(result.stderr, result.stdout, needles, tmp_path / "bundle")
    assert "re-run `leukocam convert`" in result.stderr or "Copy it again" in result.stderr
    assert not (tmp_path / "store").exists(), "a broken bundle is refused before the data store is opened"


def test_bad_host_on_the_command_line_is_one_line(tmp_path):
    path = _config(tmp_path, "")
    result = _serve(path, "--host", "999.1.1.1")
    _check(result.stderr, result.stdout, ["web.host", "'999.1.1.1'"], None)  # not from the file: no path


@pytest.mark.parametrize(
    "make",
    [
        lambda t: _config(t, _base_toml(t).encode("utf-16")),
        lambda t: _config(t, "[quality]\nmin_focus = nan\n"),
        lambda t: _bundle_config(t, edit=_set("threshold", "0.5")),
        lambda t: _bundle_config(t, golden=_truncated_golden),
    ],
    ids=["utf16", "nan", "threshold-string", "golden-truncated"],
)
def test_real_process_prints_one_line(tmp_path, make):
    """What an operator sees: exactly one stderr line (no log lines, no traceback) and exit code 2."""
    path = make(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "device.cli", "serve", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "store").exists()
