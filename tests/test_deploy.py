"""Bundle store (install, refuse, prune, start-up rollback) and `deploy` over a working fake ssh.

Real files, real symlinks, the real classifier self-test on copies of the shipped
demo bundle. The fake ssh is a script that drops the host and runs the command
here, mapping `sudo -u leukocam leukocam` to `python -m device.bundle_store`, `systemctl
restart` to what the service does at start-up (resolve_active_bundle) and
`curl .../api/health` to that start-up's result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.deploy import DeployError, deploy
from device.bundle import sha256_file
from device.bundle_store import (
    CURRENT,
    PREVIOUS,
    REJECTED,
    bundle_id,
    install_bundle,
    list_bundles,
    resolve_active_bundle,
    rollback,
)
from device.errors import BundleError

REPO = Path(__file__).resolve().parents[1]


# -- bundles to install --------------------------------------------------------------------------
def _edit_meta(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    meta.update(changes)
    (bundle / "model.json").write_text(json.dumps(meta, indent=2))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def make_bundle(tmp_path, demo_bundle_dir):
    """Copies of the demo bundle. Each `name` gives a distinct valid bundle (model.json differs)."""

    def make(name: str, *, tampered: bool = False, wrong_golden: bool = False) -> Path:
        dst = tmp_path / "src" / name
        shutil.copytree(demo_bundle_dir, dst)
        _edit_meta(dst, name=name)
        if tampered:
            _flip_byte(dst / "model.tflite")
        if wrong_golden:
            # Consistent hashes, wrong expectations: only the self-test can catch this.
            with np.load(dst / "golden.npz") as npz:
                golden = dict(npz)
            golden["probabilities"] = 1.0 - golden["probabilities"]
            np.savez(dst / "golden.npz", **golden)
            meta = json.loads((dst / "model.json").read_text())
            meta["golden"]["sha256"] = sha256_file(dst / "golden.npz")
            _edit_meta(dst, golden=meta["golden"])
        return dst

    return make


def _target(store: Path, role: str) -> str | None:
    link = store / role
    return Path(os.readlink(link)).name if link.is_symlink() else None


def _installed(store: Path) -> set[str]:
    return {p.name for p in (store / "bundles").iterdir()}


# -- install -------------------------------------------------------------------------------------
def test_install_sets_current_and_keeps_previous(tmp_path, make_bundle):
    store = tmp_path / "store"
    a, b = make_bundle("a"), make_bundle("b")
    assert bundle_id(a) != bundle_id(b), "model.json is part of the bundle id"

    first = install_bundle(a, store)
    assert first.changed and first.previous is None
    assert "self-test passed" in first.message
    assert _target(store, CURRENT) == bundle_id(a) == first.bundle_id
    assert (store / CURRENT).resolve() == first.path.resolve()
    assert not (store / PREVIOUS).is_symlink()
    assert first.sha256 == sha256_file(a / "model.tflite")

    second = install_bundle(b, store)
    assert (_target(store, CURRENT), _target(store, PREVIOUS)) == (bundle_id(b), bundle_id(a))
    assert second.previous == bundle_id(a)
    assert json.loads((store / CURRENT / "model.json").read_text())["name"] == "b"

    again = install_bundle(b, store)
    assert not again.changed and "already current" in again.message
    assert (_target(store, CURRENT), _target(store, PREVIOUS)) == (bundle_id(b), bundle_id(a))
    assert not list(store.glob(".incoming-*")), "temporary copies are removed"


def test_tampered_bundle_is_refused_and_current_kept(tmp_path, make_bundle):
    store = tmp_path / "store"
    good = install_bundle(make_bundle("good"), store)
    with pytest.raises(BundleError, match=r"sha256 .* does not match .*running bundle was kept"):
        install_bundle(make_bundle("bad", tampered=True), store)
    assert _target(store, CURRENT) == good.bundle_id
    assert _installed(store) == {good.bundle_id}
    assert not list(store.glob(".incoming-*"))


def test_bundle_failing_its_self_test_is_refused(tmp_path, make_bundle):
    store = tmp_path / "store"
    good = install_bundle(make_bundle("good"), store)
    with pytest.raises(BundleError, match=r"self-test FAILED.*running bundle was kept"):
        install_bundle(make_bundle("wrong", wrong_golden=True), store)
    assert _target(store, CURRENT) == good.bundle_id and not (store / PREVIOUS).is_symlink()
    assert _installed(store) == {good.bundle_id}


def test_bad_schema_is_refused_with_what_is_wrong(tmp_path, make_bundle):
    store = tmp_path / "store"
    src = make_bundle("future")
    _edit_meta(src, schema_version=99)
    with pytest.raises(BundleError, match="schema_version 99"):
        install_bundle(src, store)
    assert not (store / CURRENT).is_symlink()


def test_old_bundles_are_pruned_but_never_current_or_previous(tmp_path, make_bundle):
    store = tmp_path / "store"
    ids = [install_bundle(make_bundle(f"m{i}"), store, keep=3).bundle_id for i in range(5)]
    assert _installed(store) == set(ids[-3:])
    install_bundle(make_bundle("m5"), store, keep=1)
    assert _installed(store) == {bundle_id(tmp_path / "src" / "m5"), ids[-1]}, "previous survives keep=1"
    entries = {e.bundle_id: e for e in list_bundles(store)}
    assert entries[ids[-1]].roles == (PREVIOUS,)
    assert entries[bundle_id(tmp_path / "src" / "m5")].name == "m5"


# -- start-up: resolve and roll back -------------------------------------------------------------
def test_startup_rolls_back_when_current_was_damaged(tmp_path, make_bundle):
    store = tmp_path / "store"
    a = install_bundle(make_bundle("a"), store)
    b = install_bundle(make_bundle("b"), store)
    _flip_byte(b.path / "model.tflite")  # damaged on the device after it was installed

    active = resolve_active_bundle(store)
    try:
        assert active.rolled_back
        assert active.bundle.meta["name"] == "a" and active.self_test.passed
        assert b.bundle_id in active.note and "sha256" in active.note and a.bundle_id in active.note
        assert _target(store, CURRENT) == a.bundle_id
        assert _target(store, REJECTED) == b.bundle_id
        assert not (store / PREVIOUS).is_symlink()
    finally:
        active.classifier.close()

    steady = resolve_active_bundle(store)  # the next start-up runs `a` without any rollback
    steady.classifier.close()
    assert not steady.rolled_back and steady.note == ""


def test_startup_with_both_bundles_broken_lists_both(tmp_path, make_bundle):
    store = tmp_path / "store"
    a = install_bundle(make_bundle("a"), store)
    b = install_bundle(make_bundle("b"), store)
    _flip_byte(a.path / "model.tflite")
    (b.path / "golden.npz").unlink()
    with pytest.raises(BundleError) as err:
        resolve_active_bundle(store)
    msg = str(err.value)
    assert f"current ({b.bundle_id})" in msg and "golden.npz" in msg
    assert f"previous ({a.bundle_id})" in msg and "sha256" in msg
    assert _target(store, CURRENT) == b.bundle_id, "nothing to roll back to: links unchanged"


def test_plain_bundle_folder_and_empty_store(tmp_path, make_bundle, demo_bundle_dir):
    active = resolve_active_bundle(demo_bundle_dir)
    active.classifier.close()
    assert not active.rolled_back and active.self_test.passed
    with pytest.raises(BundleError, match="self-test FAILED"):
        resolve_active_bundle(make_bundle("wrong", wrong_golden=True))
    (tmp_path / "empty" / "bundles").mkdir(parents=True)
    with pytest.raises(BundleError, match="no current bundle") as info:
        resolve_active_bundle(tmp_path / "empty")
    assert f"--store {tmp_path / 'empty'}" in str(info.value) and "{path}" not in str(info.value)


def test_operator_rollback_swaps_current_and_previous(tmp_path, make_bundle):
    store = tmp_path / "store"
    a = install_bundle(make_bundle("a"), store)
    with pytest.raises(BundleError, match="no previous bundle"):
        rollback(store)
    b = install_bundle(make_bundle("b"), store)
    result = rollback(store)
    assert (result.current, result.previous) == (a.bundle_id, b.bundle_id)
    assert (_target(store, CURRENT), _target(store, PREVIOUS)) == (a.bundle_id, b.bundle_id)
    _flip_byte(b.path / "model.tflite")
    with pytest.raises(BundleError, match="nothing changed"):
        rollback(store)
    assert _target(store, CURRENT) == a.bundle_id


def test_store_commands_print_one_line_and_fail_with_exit_2(tmp_path, make_bundle):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "device.bundle_store"]
    ok = subprocess.run(
        [*cmd, "install-bundle", str(make_bundle("a")), "--store", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "installed bundle" in ok.stdout and "self-test passed" in ok.stdout
    bad = subprocess.run(
        [*cmd, "install-bundle", str(make_bundle("bad", tampered=True)), "--store", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: refused bundle" in bad.stderr


# -- deploy over a working fake ssh --------------------------------------------------------------
FAKE_SSH = """\
#!{python}
# Fake ssh: drop the host, run the command here. Records each call in {log}.
import json, os, shlex, subprocess, sys

host, words = sys.argv[1], shlex.split(" ".join(sys.argv[2:]))
with open({log!r}, "a") as fh:
    fh.write(json.dumps([host, words]) + "\\n")
if host == "unreachable":
    print("ssh: connect to host unreachable port 22: No route to host", file=sys.stderr)
    sys.exit(255)
os.chdir({repo!r})
sys.path.insert(0, {repo!r})
if words[:4] == ["sudo", "-u", "leukocam", "leukocam"]:
    sys.exit(subprocess.call([sys.executable, "-m", "device.bundle_store", *words[4:]]))
if words[:3] == ["sudo", "systemctl", "restart"]:
    # What `leukocam serve` does at start-up, and what /api/health then reports.
    from device.bundle_store import resolve_active_bundle
    active = resolve_active_bundle({store!r})
    health = {{"ok": True, "model": {{"sha256": active.bundle.sha256, "name": active.bundle.meta.get("name"),
               "rolled_back": active.rolled_back, "note": active.note}}}}
    open({health!r}, "w").write(json.dumps(health))
    sys.exit(0)
if words[0] == "curl":
    sys.stdout.write(open({health!r}).read())
    sys.exit(0)
sys.exit(subprocess.call(["bash", "-c", " ".join(sys.argv[2:])]))
"""

FAKE_RSYNC = """\
#!{python}
# rsync stand-in for machines without rsync: `-a --delete [-e SSH] SRC/ HOST:DST/` as a local copy.
import shutil, sys

args = sys.argv[1:]
src, dest = args[-2], args[-1]
host, _, path = dest.partition(":")
if host == "unreachable":
    print("ssh: connect to host unreachable port 22: No route to host", file=sys.stderr)
    sys.exit(255)
shutil.rmtree(path, ignore_errors=True)
shutil.copytree(src, path)
"""


@pytest.fixture
def pi(tmp_path):
    """A fake Pi: ssh/rsync programs, its /tmp, its bundle store, and the log of remote commands."""
    log, health = tmp_path / "ssh.log", tmp_path / "health.json"
    store, remote = tmp_path / "pi" / "bundles", tmp_path / "pi" / "tmp"
    remote.mkdir(parents=True)
    fmt = {"python": sys.executable, "log": str(log), "repo": str(REPO), "store": str(store), "health": str(health)}
    ssh = tmp_path / "fake_ssh"
    ssh.write_text(FAKE_SSH.format(**fmt))
    ssh.chmod(0o755)
    rsync = shutil.which("rsync")
    if rsync is None:
        fake = tmp_path / "fake_rsync"
        fake.write_text(FAKE_RSYNC.format(**fmt))
        fake.chmod(0o755)
        rsync = str(fake)

    class Pi:
        def deploy(self, bundle, host="pi.local", **kw):
            return deploy(
                bundle,
                host,
                remote_dir=str(remote),
                ssh=str(ssh),
                rsync=rsync,
                store=str(store),
                health_tries=2,
                health_delay=0,
                echo=self.lines.append,
                **kw,
            )

        def calls(self):
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

    p = Pi()
    p.store, p.remote, p.lines = store, remote, []
    return p


def _remote_steps(pi) -> list[str]:
    # rsync's own `rsync --server` calls (real rsync over the fake ssh) are transport, not steps.
    return [" ".join(words[:3]) for host, words in pi.calls() if words[0] != "rsync"]


def test_deploy_installs_restarts_and_confirms(make_bundle, pi):
    a = make_bundle("a")
    commands = pi.deploy(a)
    assert _target(pi.store, CURRENT) == bundle_id(a)
    assert _remote_steps(pi) == [
        "sudo -u leukocam",
        "rm -rf " + commands[2][-1],
        "sudo systemctl restart",
        "curl -fsS http://127.0.0.1:8080/api/health",
    ]
    assert {host for host, _ in pi.calls()} == {"pi.local"}
    assert not any(pi.remote.iterdir()), "the copy in the Pi's /tmp is removed after install"
    assert any("is up with model sha256 " + sha256_file(a / "model.tflite")[:12] in line for line in pi.lines)

    b = make_bundle("b")
    pi.deploy(b)
    assert (_target(pi.store, CURRENT), _target(pi.store, PREVIOUS)) == (bundle_id(b), bundle_id(a))


def test_deploy_of_a_bundle_the_pi_refuses_keeps_the_running_one(make_bundle, pi):
    a = make_bundle("a")
    pi.deploy(a)
    restarts = _remote_steps(pi).count("sudo systemctl restart")
    with pytest.raises(DeployError, match=r"pi.local refused the bundle: .*self-test FAILED.*not restarted"):
        pi.deploy(make_bundle("wrong", wrong_golden=True))
    assert _target(pi.store, CURRENT) == bundle_id(a)
    assert _remote_steps(pi).count("sudo systemctl restart") == restarts


def test_deploy_to_an_unreachable_host_says_nothing_changed(make_bundle, pi):
    with pytest.raises(DeployError, match=r"could not copy .*unreachable.*Nothing was changed on the Pi"):
        pi.deploy(make_bundle("a"), host="unreachable")
    assert not pi.store.exists()


def test_deploy_refuses_a_tampered_local_bundle_before_sending(make_bundle, pi):
    with pytest.raises(BundleError, match="not deploying, nothing was sent.*sha256"):
        pi.deploy(make_bundle("bad", tampered=True))
    assert pi.calls() == [] and not any(pi.remote.iterdir())


def test_dry_run_returns_the_commands_and_runs_nothing(make_bundle, demo_bundle_dir):
    def runner(*_a, **_k):
        raise AssertionError("dry run must not run anything")

    commands = deploy(demo_bundle_dir, "pi@leukocam.local", dry_run=True, runner=runner, ssh="ssh", rsync="rsync")
    bid = bundle_id(demo_bundle_dir)
    assert commands[0] == [
        "rsync",
        "-a",
        "--delete",
        f"{demo_bundle_dir}/",
        f"pi@leukocam.local:/tmp/leukocam-bundle-{bid}/",
    ]
    assert commands[1] == [
        "ssh",
        "pi@leukocam.local",
        "sudo",
        "-u",
        "leukocam",
        "leukocam",
        "install-bundle",
        f"/tmp/leukocam-bundle-{bid}",
        "--store",
        "/var/lib/leukocam/bundles",
    ]
    assert commands[3] == ["ssh", "pi@leukocam.local", "sudo", "systemctl", "restart", "leukocam"]
    assert commands[4][-3:] == ["curl", "-fsS", "http://127.0.0.1:8080/api/health"]


def test_ssh_and_rsync_come_from_the_environment(monkeypatch, demo_bundle_dir):
    monkeypatch.setenv("LEUKOCAM_SSH", "ssh -p 2222")
    monkeypatch.setenv("LEUKOCAM_RSYNC", "/opt/bin/rsync")
    commands = deploy(demo_bundle_dir, "pi", dry_run=True)
    assert commands[0][:5] == ["/opt/bin/rsync", "-a", "--delete", "-e", "ssh -p 2222"]
    assert commands[1][:4] == ["ssh", "-p", "2222", "pi"]


def test_deploy_reports_a_rollback_on_the_pi(demo_bundle_dir):
    health = {
        "ok": True,
        "model": {
            "sha256": "0" * 64,
            "rolled_back": True,
            "note": "bundle x was refused at start-up (self-test FAILED); rolled back to y",
        },
    }

    def runner(cmd, **_kw):
        out = json.dumps(health) if "curl" in cmd else ""
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    with pytest.raises(DeployError, match=r"runs model sha256 000000000000.*rolled back.*self-test FAILED"):
        deploy(demo_bundle_dir, "pi", runner=runner, health_tries=1, health_delay=0, echo=lambda _s: None)
