"""Issue #13 "Friction": each fix, with the test that would have caught it (the real CLI where it matters).

The LED (task 6) is tested in test_trigger.py, the [slides] section and the discovery order as such in
test_config.py, image messages in test_imaging.py and zips in test_datasets.py; here is what the operator
meets on the command line.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import pty
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import device.config
from device.cli import cli
from device.config import DEMO_FIELDS

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
INTERNALS = re.compile(r"[A-Za-z]+(Error|Exception)\b|0x[0-9a-f]+|object at|Traceback|<_io")
"""Exception class names (OSError, UnidentifiedImageError), object reprs and addresses; click's own "Error: "
prefix for a message is not one of them."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rig(tmp_path: Path, name: str = "rig.toml", *, port: int | None = None, host: str = "127.0.0.1") -> Path:
    """A config of its own: its store under tmp_path, no start-up captures, a port nothing listens on."""
    path = tmp_path / name
    store = tmp_path / f"store-{path.stem}"
    path.write_text(
        f"[store]\ndata_dir = {json.dumps(str(store))}\nmin_free_mb = 1\n"
        f"[service]\nstartup_captures = 0\n[model]\nthreads = 1\n"
        f"[web]\nhost = {json.dumps(host)}\nport = {port or _free_port()}\n",
        encoding="utf-8",
    )
    return path


def _store(config: Path) -> Path:
    return Path(tomllib.loads(config.read_text(encoding="utf-8"))["store"]["data_dir"])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LEUKOCAM_CONFIG"}
    return env | extra


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $LEUKOCAM_CONFIG and no system config, whatever the machine running the tests has."""
    monkeypatch.delenv("LEUKOCAM_CONFIG", raising=False)
    monkeypatch.setattr(device.config, "SYSTEM_CONFIG", tmp_path / "etc" / "leukocam.toml")


@pytest.fixture
def restore_waitress_logger():
    logger = logging.getLogger("waitress.queue")
    level = logger.level
    yield logger
    logger.setLevel(level)


# -- 1. one config discovery order for every command ------------------------------------------------

FIELD = str(sorted(DEMO_FIELDS.glob("*.jpg"))[0])
COMMAND_ARGS = {
    "serve": [],
    "capture": [],
    "set-password": ["alice", "--password", PASSWORD],
    "calibrate-qc": [FIELD],
    "doctor": [],
}
"""Every command that takes --config, with the arguments it needs besides."""


def _commands_with_a_config() -> set[str]:
    ctx = cli.make_context("leukocam", ["--help"], resilient_parsing=True)
    found = set()
    for name in cli.list_commands(ctx):
        try:
            command = cli.get_command(ctx, name)
        except Exception:  # a workstation command without its extras installed
            continue
        if any(p.name == "config_path" for p in command.params):
            found.add(name)
    return found


def test_every_command_that_takes_a_config_is_covered():
    assert _commands_with_a_config() == set(COMMAND_ARGS)


@pytest.mark.parametrize("command", list(COMMAND_ARGS))
@pytest.mark.parametrize("chosen", ["flag", "env", "system"])
def test_every_command_finds_its_config_the_same_way(isolated, monkeypatch, tmp_path, command, chosen):
    """--config, then $LEUKOCAM_CONFIG, then the system file: each candidate is broken in its own file,
    so the one error line names the file the command really read."""
    files = {name: tmp_path / f"{name}-config.toml" for name in ("flag", "env", "system")}
    for path in files.values():
        path.write_text("[web]\nport = 70000\n", encoding="utf-8")
    monkeypatch.setattr(device.config, "SYSTEM_CONFIG", files["system"])
    if chosen in ("flag", "env"):
        monkeypatch.setenv("LEUKOCAM_CONFIG", str(files["env"]))
    flag = ["--config", str(files["flag"])] if chosen == "flag" else []
    result = CliRunner().invoke(cli, [command, *flag, *COMMAND_ARGS[command]])
    assert result.exit_code in (1, 2), result.output  # doctor reports and exits 1; the others say error:, 2
    assert str(files[chosen]) in result.output and "web.port = 70000" in result.output, result.output
    for other, path in files.items():
        if other != chosen:
            assert str(path) not in result.output


def test_set_password_writes_where_the_server_looks(isolated, monkeypatch, tmp_path):
    """The bug: set-password wrote auth.json into the embedded default's data folder, not the server's."""
    from device.accounts import load_users

    installed, other = _rig(tmp_path, "installed.toml"), _rig(tmp_path, "other.toml")
    monkeypatch.setattr(device.config, "SYSTEM_CONFIG", installed)
    result = CliRunner().invoke(cli, ["set-password", "alice", "--password", PASSWORD])  # as on the Pi
    assert result.exit_code == 0, result.output
    assert str(installed) in result.output and str(_store(installed) / "auth.json") in result.output
    monkeypatch.setenv("LEUKOCAM_CONFIG", str(other))
    assert CliRunner().invoke(cli, ["set-password", "bob", "--password", PASSWORD]).exit_code == 0
    result = CliRunner().invoke(cli, ["set-password", "--config", str(installed), "carol", "--password", PASSWORD])
    assert result.exit_code == 0, result.output
    assert set(load_users(_store(installed))) == {"alice", "carol"}
    assert set(load_users(_store(other))) == {"bob"}


def test_serve_hint_is_the_exact_command_and_queue_noise_is_off(
    isolated, monkeypatch, tmp_path, caplog, restore_waitress_logger
):
    """A server that requires a login and has no account names the set-password command with its --config."""
    port = _free_port()
    rig = _rig(tmp_path, "lab network.toml", host="0.0.0.0", port=port)

    class Server:  # stands in for waitress: serve runs its whole start-up and shutdown around it
        effective_port = port

        def run(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr("device.web.server.make_server", lambda app, web: Server())
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    restore_waitress_logger.setLevel(logging.NOTSET)
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(cli, ["serve", "--config", str(rig)])
    assert result.exit_code == 0, (result.output, result.exception)
    messages = [r.getMessage() for r in caplog.records]
    hint = next(m for m in messages if "requires a login" in m)
    assert f"run `leukocam set-password --config '{rig}' USER`" in hint, hint
    assert f"config: {rig} (--config)" in messages
    assert restore_waitress_logger.getEffectiveLevel() == logging.ERROR  # no "Task queue depth is N" warnings
    # The command in the hint works as printed, and then the account is where the server looks.
    from device.accounts import load_users

    args = shlex.split(hint.split("`")[1].replace("USER", "alice"))[1:]
    assert CliRunner().invoke(cli, [*args, "--password", PASSWORD]).exit_code == 0
    assert "alice" in load_users(_store(rig))


# -- 2. a second serve on a port in use --------------------------------------------------------------


@pytest.mark.parametrize("via", ["config", "--port"])
def test_a_second_serve_on_a_busy_port_is_one_line(tmp_path, via):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rig = _rig(tmp_path, port=port if via == "config" else None)
        extra = ["--port", str(port)] if via == "--port" else []
        proc = subprocess.run(
            [sys.executable, "-m", "device.cli", "serve", "--config", str(rig), *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: port {port} on 127.0.0.1 is already in use"), lines[0]
    assert "`--port N`" in lines[0] and f"[web] port in {rig}" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not _store(rig).exists(), "the second server must stop before it touches the store"


def test_a_port_taken_between_the_check_and_the_server_is_one_line_too(isolated, monkeypatch, tmp_path):
    import device.cli

    def taken(app, web):
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(device.cli, "_check_can_listen", lambda *args: None)
    monkeypatch.setattr("device.web.server.make_server", taken)
    rig = _rig(tmp_path)
    result = CliRunner().invoke(cli, ["serve", "--config", str(rig)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is already in use" in result.stderr and "--port N" in result.stderr
    assert "Traceback" not in result.output


# -- 3. data inspect reads the dashboard's export zip -------------------------------------------------


def _export_zip(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    """A real export of three reviewed cells on two slides; returns the zip and cell id -> reviewer's label."""
    from device import export
    from device.store import Store
    from tests.test_slides import record

    store = Store(tmp_path / "store")
    a = store.save_capture(record("S1", [True, False, True]))
    b = store.save_capture(record("S2", [False, False]))
    ca, cb = store.get_capture(a)["cells"], store.get_capture(b)["cells"]
    store.add_review(ca[0]["id"], "normal", "alice")  # the model said blast
    store.add_review(ca[1]["id"], "blast", "bob")
    store.add_review(cb[0]["id"], "normal", "alice")
    fh, n = export.export_dataset(store)
    assert n == 3
    path = tmp_path / "leukocam-export.zip"
    path.write_bytes(fh.read())
    store.close()
    return path, {ca[0]["id"]: 0, ca[1]["id"]: 1, cb[0]["id"]: 0}


def test_data_inspect_and_read_dataset_take_the_export_zip_as_downloaded(tmp_path, monkeypatch):
    from training.datasets import read_dataset

    zipped, labels = _export_zip(tmp_path)
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "device.cli", "data", "inspect", str(zipped)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(LEUKOCAM_CACHE=str(cache)),
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first == f"{zipped}: 3 labelled images {{'blast': 1, 'normal': 2}}, 2 subjects", proc.stdout
    assert "Traceback" not in proc.stderr and "not found" not in proc.stderr
    monkeypatch.setenv("LEUKOCAM_CACHE", str(cache))
    samples = read_dataset(zipped)
    got = {int(re.search(r"UID_\d+_\d+_(\d+)_", s.path.name).group(1)): s.label for s in samples}
    assert got == labels  # the reviewer's verdicts
    assert len({s.subject for s in samples}) == 2  # one subject per slide


def test_the_export_manifest_is_a_manifest_data_inspect_reads(tmp_path):
    zipped, labels = _export_zip(tmp_path)
    with zipfile.ZipFile(zipped) as zf:
        manifest = zf.read("manifest.csv").decode()
        zf.extractall(tmp_path / "unpacked")
    assert manifest.startswith("path,label,subject,")
    rows = list(csv.DictReader(io.StringIO(manifest)))
    assert {int(r["cell_id"]) for r in rows} == set(labels)
    result = CliRunner().invoke(cli, ["data", "inspect", "--json", str(tmp_path / "unpacked" / "manifest.csv")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["per_class"], report["subjects"]) == (3, {"blast": 1, "normal": 2}, 2)
    assert report["unreadable"] == []


# -- 4. error messages without Python internals -------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    import numpy as np

    from device.imaging import encode_image

    png = encode_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")
    files = {
        "garbage.jpg": os.urandom(4096),
        "truncated.png": png[: len(png) // 2],
        "notes.txt": b"slide S-12: 3 blasts in 100 cells, recheck tomorrow\n" * 20,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize("command", ["capture", "calibrate-qc", "calibrate"])
def test_unreadable_files_are_plain_messages_on_the_command_line(isolated, tmp_path, command):
    rig = _rig(tmp_path)
    for name, path in _bad_files(tmp_path).items():
        config = [] if command == "calibrate" else ["--config", str(rig)]
        result = CliRunner().invoke(cli, [command, *config, str(path)])
        assert result.exit_code != 0, result.output
        assert name in result.output and "not a readable image" in result.output, result.output
        assert "use a JPEG, PNG, BMP or TIFF file" in result.output
        assert not INTERNALS.search(result.output), result.output
        assert result.output.count(str(path)) == 1, result.output  # named once, not "x: skipped (x: ...)"
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


# -- 5. terminal noise ---------------------------------------------------------------------------------


def test_pyproject_license_is_the_pep639_form():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["license"] == "MIT"  # an SPDX string, not the deprecated {text = ...} table
    assert meta["project"]["license-files"] == ["LICENSE"] and (REPO / "LICENSE").is_file()
    setuptools = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(setuptools.split(">=")[1].split(".")[0]) >= 77  # the first setuptools that reads it


@pytest.mark.slow
def test_building_the_package_prints_no_deprecation_warning(tmp_path):
    """What `pip install -e .` printed three times; builds a wheel from a copy of the tracked files."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    copy = tmp_path / "src"
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO / name).read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "wheel"), str(copy)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and re.search(r"Could not find a version|NewConnectionError|Network", proc.stderr):
        pytest.skip("no package index for the build backend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "project.license" not in output and "Deprecat" not in output, output[-3000:]


def test_no_xnnpack_notice_when_the_device_builds_its_interpreter():
    code = (
        "import os\n"
        "from device import runtime\n"
        "from device.config import DEMO_BUNDLE\n"
        "runtime.make_interpreter(DEMO_BUNDLE / 'model.tflite', threads=1)\n"
        "with runtime.without_native_notices():\n"
        "    os.write(2, b'E runtime: something real\\n')\n"
        "print(runtime.runtime_name())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "XNNPACK" not in proc.stderr, proc.stderr
    assert "E runtime: something real" in proc.stderr  # anything else the runtime says still shows
    if proc.stdout.strip() == "ai_edge_litert":  # the control: LiteRT itself does print it
        raw = (
            "from device import runtime\nfrom device.config import DEMO_BUNDLE\n"
            "cls, _ = runtime.interpreter_class()\n"
            "cls(model_path=str(DEMO_BUNDLE / 'model.tflite'), num_threads=1).allocate_tensors()\n"
        )
        control = subprocess.run([sys.executable, "-c", raw], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert "XNNPACK" in control.stderr


SUMMARY = re.compile(r"^capture \d+, slide [^,]+, ok, \d+ cells?, \d+ blasts?(, \d+ to review)?: .+$")


def test_capture_prints_one_line_or_json_when_asked(isolated, tmp_path):
    rig = _rig(tmp_path)
    summary = CliRunner().invoke(cli, ["capture", "--config", str(rig), "--summary"])
    assert summary.exit_code == 0, summary.output
    lines = summary.stdout.splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), summary.stdout
    assert "[SYNTHETIC demo model: not clinical]" in lines[0]
    full = CliRunner().invoke(cli, ["capture", "--config", str(rig), "--json"])
    result = json.loads(full.stdout)
    assert result["outcome"]["status"] == "ok" and result["capture"]["cells"]
    plain = CliRunner().invoke(cli, ["capture", "--config", str(rig)])  # the default, into a pipe too: one line
    assert len(plain.stdout.splitlines()) == 1 and SUMMARY.match(plain.stdout.strip()), plain.stdout


def test_capture_on_a_terminal_is_one_line(tmp_path):
    rig = _rig(tmp_path)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "device.cli", "capture", "--config", str(rig)],
            cwd=REPO,
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=120,
            env=_env(),
        )
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.decode().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), out
    assert b"XNNPACK" not in proc.stderr
