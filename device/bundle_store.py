"""The device's bundle store: installed model bundles, `current`, `previous`, rollback.

On the Pi the store is `/var/lib/leukocam/bundles`:

    bundles/<bundle id>/   one folder per installed bundle (model.tflite, model.json, golden.npz)
    current -> bundles/<id>    the bundle the service runs
    previous -> bundles/<id>   the one it ran before; the rollback target
    rejected -> bundles/<id>   set when start-up refused `current` and rolled back

A bundle id is `<sha256(model.tflite)[:12]>-<sha256(model.json)[:6]>`. The tflite
hash alone is not enough: model.json is not hashed inside the bundle, and a
re-conversion can keep the same tflite with a new threshold, review band or
golden set, which is a different bundle to run.

A bundle becomes `current` only after it passed `load_bundle` (hash, schema,
golden file) and the Classifier self-test in its final place on this device.
Symlinks are switched with `os.replace`, so a crash leaves either the old or
the new link, never none. Never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from device.bundle import META_FILE, MODEL_FILE, Bundle, load_bundle, sha256_file
from device.classifier import Classifier, SelfTestResult
from device.cli_base import ReportingGroup
from device.config import MAX_THREADS
from device.errors import BundleError

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("/var/lib/leukocam/bundles")
BUNDLES_DIR = "bundles"
CURRENT = "current"
PREVIOUS = "previous"
REJECTED = "rejected"
INCOMING_PREFIX = ".incoming-"
LOCK_FILE = ".lock"
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class InstallResult:
    path: Path
    """The installed bundle folder, bundles/<bundle id>."""
    bundle_id: str
    """Store key: <tflite sha256[:12]>-<model.json sha256[:6]>."""
    sha256: str
    """Full sha256 of model.tflite (what the dashboard and results show)."""
    previous: str | None
    """Bundle id that `previous` now points to (the rollback target), or None."""
    changed: bool
    """False when this bundle was already `current` (a no-op)."""
    message: str
    """One line for the operator, including the self-test result."""


@dataclass(frozen=True)
class ActiveBundle:
    bundle: Bundle
    classifier: Classifier
    """Already built (and self-tested when asked); the caller owns it and closes it."""
    self_test: SelfTestResult | None
    """The start-up self-test, or None when it was switched off."""
    rolled_back: bool
    """True when `current` was refused at start-up and the store switched back to `previous`."""
    note: str
    """Why a rollback happened ('' when none); meant for the health report."""


@dataclass(frozen=True)
class StoreEntry:
    bundle_id: str
    path: Path
    sha256: str | None
    """tflite sha256 recorded in model.json (None when model.json is unreadable)."""
    name: str
    roles: tuple[str, ...]
    """Which of current / previous / rejected point here."""
    installed: float
    """Install time (folder mtime, seconds since the epoch)."""


@dataclass(frozen=True)
class RollbackResult:
    current: str
    previous: str
    message: str


def bundle_id(bundle_dir: str | Path) -> str:
    """Store key of a bundle folder, from the files as they are (not as model.json claims)."""
    bundle_dir = Path(bundle_dir)
    try:
        json_sha = sha256_file(bundle_dir / META_FILE)
        tflite_sha = sha256_file(bundle_dir / MODEL_FILE)
    except OSError as exc:
        raise BundleError(f"{bundle_dir}: cannot read the bundle ({exc.strerror}: {exc.filename})") from None
    return f"{tflite_sha[:12]}-{json_sha[:6]}"


def is_store(path: str | Path) -> bool:
    """True for a bundle store (has `current` or `bundles/`), False for a plain bundle folder."""
    path = Path(path)
    return (path / CURRENT).is_symlink() or (path / BUNDLES_DIR).is_dir()


def _open_checked(path: Path, threads: int, self_test: bool) -> tuple[Bundle, Classifier, SelfTestResult | None]:
    """load_bundle + Classifier (+ self-test). Raises BundleError; never leaks an open classifier."""
    bundle = load_bundle(path)
    clf = None
    try:
        clf = Classifier(bundle, threads=threads)
        result = clf.self_test() if self_test else None
    except BundleError:
        if clf is not None:
            clf.close()
        raise
    except Exception as exc:  # a model file the runtime cannot load or run is a bad bundle too
        if clf is not None:
            clf.close()
        raise BundleError(f"{path}: the runtime could not run the model ({type(exc).__name__}: {exc})") from None
    if result is not None and not result.passed:
        clf.close()
        raise BundleError(f"{path}: {result.message}")
    return bundle, clf, result


def _link_target(store: Path, name: str) -> str | None:
    """Bundle id a role link points to, or None when the link does not exist."""
    link = store / name
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def _set_link(store: Path, name: str, target_id: str | None) -> None:
    """Point store/name at bundles/<target_id> atomically (None removes the link)."""
    link = store / name
    if target_id is None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        return
    tmp = store / f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # Relative target: the store keeps working when it is moved or mounted elsewhere.
    os.symlink(f"{BUNDLES_DIR}/{target_id}", tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """One writer at a time (an install and a start-up rollback must not interleave)."""
    with open(store / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare_store(store: Path) -> None:
    try:
        (store / BUNDLES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(
            f"{store}: cannot create the bundle store ({exc.strerror}); run the install as root"
        ) from None


def _remove_stale_incoming(store: Path) -> None:
    # Left behind only by a crash in the middle of an install; nothing points at them.
    for stale in store.glob(f"{INCOMING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def install_bundle(
    src_dir: str | Path, store_dir: str | Path = DEFAULT_STORE, threads: int = 1, keep: int = DEFAULT_KEEP
) -> InstallResult:
    """Verify a bundle on this device and make it `current`; the old current becomes `previous`.

    Args:
        src_dir: a bundle folder (for example the one `leukocam deploy` copied to /tmp).
        store_dir: the bundle store.
        threads: interpreter threads for the self-test.
        keep: installed bundles to keep at most; current and previous are never removed.

    Raises:
        BundleError: the copy fails load_bundle or the self-test. Nothing in the store
            changes and the running bundle is kept.
    """
    src = Path(src_dir)
    store = Path(store_dir)
    if not src.is_dir():
        raise BundleError(f"{src}: bundle folder not found; nothing was installed, the running bundle was kept")
    _prepare_store(store)
    with _locked(store):
        _remove_stale_incoming(store)
        incoming = Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=store))
        try:
            # Check the copy, not the source: that is the file the service will map.
            staged = incoming / "bundle"
            shutil.copytree(src, staged, symlinks=False)
            try:
                new_id = bundle_id(staged)
                bundle, clf, result = _open_checked(staged, threads, self_test=True)
                clf.close()
            except BundleError as exc:
                raise BundleError(
                    f"refused bundle {src}: {exc}. Nothing was installed; the running bundle was kept"
                ) from None
            return _commit(store, staged, new_id, bundle.sha256, result, keep)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)


def _commit(store: Path, staged: Path, new_id: str, sha: str, result: SelfTestResult, keep: int) -> InstallResult:
    bundles = store / BUNDLES_DIR
    final = bundles / new_id
    old_current = _link_target(store, CURRENT)
    old_previous = _link_target(store, PREVIOUS)
    if old_current == new_id and final.is_dir():
        try:
            load_bundle(final)
        except BundleError:
            log.warning("current bundle %s is damaged on disk; replacing it with the verified copy", new_id)
            _replace_dir(staged, final)
            msg = f"repaired bundle {new_id} in place (it is current); {result.message}"
            return InstallResult(final, new_id, sha, old_previous, True, msg)
        msg = f"bundle {new_id} is already current; nothing changed ({result.message})"
        return InstallResult(final, new_id, sha, old_previous, False, msg)
    if final.exists():
        _replace_dir(staged, final)  # an older copy of the same id may have been damaged since
    else:
        staged.rename(final)
    os.chmod(final, 0o755)
    os.utime(final)
    new_previous = old_current if old_current and old_current != new_id else old_previous
    if new_previous == new_id:
        new_previous = None
    # previous first: at every instant `current` and `previous` name installed folders.
    _set_link(store, PREVIOUS, new_previous)
    _set_link(store, CURRENT, new_id)
    if _link_target(store, REJECTED) == new_id:
        _set_link(store, REJECTED, None)
    _prune(store, keep)
    msg = (
        f"installed bundle {new_id} (sha256 {sha[:12]}) as current; previous: {new_previous or 'none'}; "
        f"{result.message}"
    )
    log.info(msg)
    return InstallResult(final, new_id, sha, new_previous, True, msg)


def _replace_dir(new: Path, old: Path) -> None:
    trash = old.parent.parent / f"{INCOMING_PREFIX}trash-{old.name}-{os.getpid()}"
    old.rename(trash)
    new.rename(old)
    os.chmod(old, 0o755)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(store: Path, keep: int) -> None:
    """Keep the newest `keep` installed bundles, counting current and previous, which always stay."""
    protected = {_link_target(store, CURRENT), _link_target(store, PREVIOUS)} - {None}
    others = sorted(
        (p for p in (store / BUNDLES_DIR).iterdir() if p.is_dir() and p.name not in protected),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in others[max(keep - len(protected), 0) :]:
        log.info("removing old bundle %s (keeping %d)", path.name, keep)
        shutil.rmtree(path, ignore_errors=True)
    if _link_target(store, REJECTED) and not (store / REJECTED).exists():
        _set_link(store, REJECTED, None)


def precheck_bundle(path: str | Path) -> None:
    """Refuse a bad plain bundle folder (model.json fields, hashes, golden file) before anything else starts.

    Cheap next to the self-test: no interpreter is built. A bundle store is left to
    `resolve_active_bundle`, which may roll back to `previous` instead of refusing.

    Raises:
        BundleError: what `load_bundle` says.
    """
    path = Path(path)
    if not is_store(path):
        load_bundle(path)


def resolve_active_bundle(path: str | Path, threads: int = 1, self_test: bool = True) -> ActiveBundle:
    """Open the bundle the service should run, rolling a store back to `previous` when needed.

    Args:
        path: a bundle store (has `current`) or a plain bundle folder.
        threads: interpreter threads.
        self_test: run the golden self-test (a store can only roll back on what it checks).

    Raises:
        BundleError: no usable bundle; the message lists why each candidate was refused.
    """
    path = Path(path)
    if not is_store(path):
        bundle, clf, result = _open_checked(path, threads, self_test)
        return ActiveBundle(bundle, clf, result, rolled_back=False, note="")
    failures = []
    for role in (CURRENT, PREVIOUS):
        target = _link_target(path, role)
        if target is None:
            failures.append(f"{role}: not set")
            continue
        try:
            bundle, clf, result = _open_checked((path / role).resolve(), threads, self_test)
        except BundleError as exc:
            log.warning("bundle store %s: %s bundle %s refused: %s", path, role, target, exc)
            failures.append(f"{role} ({target}): {exc}")
            continue
        if role == CURRENT:
            return ActiveBundle(bundle, clf, result, rolled_back=False, note="")
        return ActiveBundle(bundle, clf, result, rolled_back=True, note=_roll_back(path, target, failures[0]))
    if not (path / CURRENT).is_symlink():
        raise BundleError(
            f"{path}: bundle store has no current bundle; install one with "
            f"`leukocam install-bundle BUNDLE --store {path}` (or `make deploy PI=...`)"
        )
    raise BundleError(f"{path}: no usable model bundle; " + "; ".join(failures))


def _roll_back(store: Path, good_id: str, why: str) -> str:
    bad_id = _link_target(store, CURRENT)
    note = f"bundle {bad_id} was refused at start-up ({why}); rolled back to {good_id}"
    try:
        with _locked(store):
            _set_link(store, CURRENT, good_id)
            _set_link(store, REJECTED, bad_id)
            # No older known-good bundle: an empty `previous` beats one that points at a broken bundle.
            _set_link(store, PREVIOUS, None)
    except OSError as exc:
        note += f"; could not repoint {store / CURRENT} ({exc.strerror}), running {good_id} for this session only"
    log.warning(note)
    return note


def rollback(store_dir: str | Path = DEFAULT_STORE, threads: int = 1) -> RollbackResult:
    """Swap `current` and `previous` after checking that `previous` still passes its self-test.

    Raises:
        BundleError: no previous bundle, or it fails its checks (nothing changes then).
    """
    store = Path(store_dir)
    if not store.is_dir():
        raise BundleError(f"{store}: bundle store not found")
    with _locked(store):
        cur, prev = _link_target(store, CURRENT), _link_target(store, PREVIOUS)
        if prev is None:
            raise BundleError(f"{store}: no previous bundle to roll back to; current is {cur or 'not set'}")
        try:
            _, clf, result = _open_checked((store / PREVIOUS).resolve(), threads, self_test=True)
        except BundleError as exc:
            raise BundleError(f"previous bundle {prev} is not usable ({exc}); nothing changed") from None
        clf.close()
        _set_link(store, CURRENT, prev)
        _set_link(store, PREVIOUS, cur)
    msg = f"rolled back: current is now {prev}, previous {cur}; {result.message}. Restart the service to use it"
    log.info(msg)
    return RollbackResult(prev, cur, msg)


def list_bundles(store_dir: str | Path = DEFAULT_STORE) -> list[StoreEntry]:
    """Installed bundles, newest first, with their roles. Reads model.json only (no self-test)."""
    store = Path(store_dir)
    bundles = store / BUNDLES_DIR
    if not bundles.is_dir():
        return []
    roles: dict[str, list[str]] = {}
    for role in (CURRENT, PREVIOUS, REJECTED):
        target = _link_target(store, role)
        if target:
            roles.setdefault(target, []).append(role)
    entries = []
    for p in bundles.iterdir():
        if not p.is_dir():
            continue
        sha, name = None, ""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            meta = json.loads((p / META_FILE).read_text(encoding="utf-8"))
            sha, name = meta.get("tflite_sha256"), str(meta.get("name", ""))
        entries.append(StoreEntry(p.name, p, sha, name, tuple(roles.get(p.name, ())), p.stat().st_mtime))
    return sorted(entries, key=lambda e: e.installed, reverse=True)


# -- commands (registered on the `leukocam` group in device/cli.py) -----------------------------

store_option = click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False),
    default=str(DEFAULT_STORE),
    show_default=True,
    help="The device's bundle store.",
)


@click.command("install-bundle")
@click.argument("src", type=click.Path(file_okay=False))
@store_option
@click.option(
    "--threads",
    type=click.IntRange(1, MAX_THREADS),
    default=1,
    show_default=True,
    help="Interpreter threads for the self-test.",
)
@click.option("--keep", type=int, default=DEFAULT_KEEP, show_default=True, help="Installed bundles to keep.")
def install_bundle_command(src, store_dir, threads, keep):
    """Check a bundle (hash, schema, shapes, self-test) and make it the current one."""
    click.echo(install_bundle(src, store_dir, threads=threads, keep=keep).message)


@click.command("rollback-bundle")
@store_option
def rollback_bundle_command(store_dir):
    """Switch back to the previous bundle (after checking it); restart the service afterwards."""
    click.echo(rollback(store_dir).message)


@click.command("list-bundles")
@store_option
def list_bundles_command(store_dir):
    """List installed bundles and which one is current / previous."""
    entries = list_bundles(store_dir)
    if not entries:
        click.echo(f"{store_dir}: no installed bundles")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.installed))
        click.echo(f"{e.bundle_id}  {when}  {e.name or '-'}  {','.join(e.roles) or '-'}")


STORE_COMMANDS = (install_bundle_command, rollback_bundle_command, list_bundles_command)


def main(argv: list[str] | None = None) -> None:
    """`python -m device.bundle_store install-bundle ...`: the store commands without the full CLI."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ReportingGroup("leukocam-store", commands={c.name: c for c in STORE_COMMANDS})(argv, prog_name="leukocam")


if __name__ == "__main__":
    main()
