"""The store on a really full disk, and on a read-only one: small tmpfs mounts, nothing mocked.

A 2 MB tmpfs holds a store; a filler file then takes every free page until the kernel says
ENOSPC. Reads must go on returning the same data (the dashboard stays up), every write must be
refused with StoreFullError saying what to do (never a bare sqlite3 / OSError), and once space
is freed the store must be intact and take writes again. Mounting needs root: without it
these tests are skipped, saying so.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from device import export
from device.errors import StoreError, StoreFullError
from device.store import DB_FILE, Store
from tests.test_store import _cell, _files, _record

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
ADVICE = "nothing was stored; export and delete old results or use a larger SD card"


def _mount(mnt: Path, options: str) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True, timeout=30
        )
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {res.stderr.strip() or res.returncode}")


def _umount(mnt: Path) -> None:
    gc.collect()  # close the anchor connections of stores nobody holds any more
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # still busy (a failed test's locals)


@pytest.fixture()
def small_disk(tmp_path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    _mount(mnt, "size=2m")
    try:
        yield mnt
    finally:
        _umount(mnt)


def _free_pages(mnt: Path) -> int:
    return os.statvfs(mnt).f_bavail


def _fill(path: Path) -> Path:
    """Write path until the disk is full (ENOSPC); the disk then has no free page left."""
    with open(path, "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\xff" * PAGE)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    assert _free_pages(path.parent) == 0
    return path


def _pages(data: bytes) -> int:
    return -(-len(data) // PAGE)


def _reads(store: Store, ids: list[int], cell_id: int) -> dict:
    """Everything the dashboard and the exports read."""
    return {
        "search": store.search_captures(),
        "search_blast": store.search_captures(label="blast"),
        "search_pending": store.search_captures(needs_review=True),
        "search_slide": store.search_captures(slide_id="slide-A", limit=2, offset=1),
        "captures": [store.get_capture(i) for i in ids],
        "count": store.count_captures(),
        "recent": store.recent_captures(),
        "timings": store.recent_timings(),
        "slide": store.slide_summary("slide-A"),
        "slides": store.list_slides(),
        "slide_ids": store.slide_ids(),
        "slide_cells": store.slide_cells("slide-A"),
        "provenance": store.slide_provenance("slide-A"),
        "cell": store.get_cell(cell_id),
        "history": store.review_history(slide_id="slide-A"),
        "current": store.current_reviews(ids[0]),
        "reconcile": store.reconcile(min_age_s=0),
        "images_bytes": store.images_bytes(),
        "field": store.image_file("field", ids[0]).read_bytes(),
        "crop": store.image_file("crop", cell_id).read_bytes(),
        "csv": export.slide_results_csv(store, "slide-A"),
        "json": json.loads(export.results_json_bytes(store, "slide-A")),
    }


def _integrity(db: Path) -> str:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def _assert_full(exc_info, *phrases: str, sqlite_full: bool = False) -> None:
    assert isinstance(exc_info.value, StoreFullError) and not isinstance(exc_info.value, sqlite3.Error | OSError)
    for phrase in phrases:
        assert phrase in str(exc_info.value)
    if sqlite_full:  # the real thing underneath: SQLite could not grow its write-ahead log
        cause = exc_info.value.__cause__ or exc_info.value.__context__
        while cause is not None and not isinstance(cause, sqlite3.Error):
            cause = cause.__cause__ or cause.__context__
        assert cause is not None and cause.sqlite_errorname == "SQLITE_FULL", repr(cause)


READER = """
import json, sys
from device.store import Store
store = Store(sys.argv[1], min_free_mb=0)
print(json.dumps({"count": store.count_captures(), "slides": store.slide_ids(), "search": store.search_captures()}))
"""


def test_full_disk_reads_go_on_writes_are_refused_and_nothing_breaks(small_disk, monkeypatch):
    data = small_disk / "data"
    store = Store(data, min_free_mb=0)  # its own free-space rule must not pre-empt the real ENOSPC
    ids = [store.save_capture(_record(seed=s)) for s in range(3)]
    cell_id = store.get_capture(ids[0])["cells"][1]["id"]
    store.add_review(cell_id, "blast", "alice", note="before the disk filled")
    before = _reads(store, ids, cell_id)
    files_before = _files(store)
    assert before["count"] == 3 and before["reconcile"].clean

    # Keep back exactly the pages a capture's images need, then take every other page.
    spare = _record(seed=9)
    image_pages = _pages(spare.field_jpeg) + sum(_pages(c.crop_png) + _pages(c.heatmap_jpeg) for c in spare.cells)
    reserve = small_disk / "reserve"
    reserve.write_bytes(b"\xff" * image_pages * PAGE)
    filler = _fill(small_disk / "filler")

    # -- reads: the same data as before, also from connections opened now ------------------------
    assert _reads(store, ids, cell_id) == before
    fresh = Store(data, min_free_mb=0)
    assert _reads(fresh, ids, cell_id) == before
    with closing(sqlite3.connect(data / DB_FILE)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM captures").fetchone()[0] == 3
    with closing(sqlite3.connect((data / DB_FILE).as_uri() + "?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 6
    assert _free_pages(small_disk) == 0

    # -- writes: refused with StoreFullError saying what to do, nothing half stored ---------------
    with pytest.raises(StoreFullError) as info:
        store.save_capture(_record(seed=10))  # the store's own rule: the capture's bytes are not free
    _assert_full(info, "nothing was written")
    monkeypatch.setattr(store, "check_space", lambda need_bytes=0: None)  # now meet the kernel's ENOSPC
    with pytest.raises(StoreFullError) as info:
        store.save_capture(_record(seed=10))
    _assert_full(info, "disk full while writing the capture's images", "partial files removed", ADVICE)
    with pytest.raises(StoreFullError) as info:
        store.add_review(cell_id, "normal", "bob")
    _assert_full(info, "disk full", ADVICE, sqlite_full=True)
    with pytest.raises(StoreFullError) as info:
        store.ensure_slide("slide-NEW")
    _assert_full(info, "disk full", ADVICE, sqlite_full=True)
    with pytest.raises(StoreFullError) as info:
        store.mark_slide_reviewed(
            "slide-A", by="alice", confirm_unreviewed=store.slide_summary("slide-A")["unreviewed"]
        )
    _assert_full(info, "disk full", ADVICE, sqlite_full=True)
    with pytest.raises(StoreFullError):
        store.add_note(ids[0], "scale check: a note")
    with pytest.raises(StoreFullError):
        store.add_timing(ids[0], "archive", 12.0)
    with pytest.raises(StoreFullError) as info:
        fresh.attach_field_image(ids[1], spare.field_jpeg)
    _assert_full(info, "disk full while writing the field image")

    # Space for the images only: they are written, the commit meets SQLITE_FULL, the images are removed again.
    reserve.unlink()
    assert _free_pages(small_disk) == image_pages
    with pytest.raises(StoreFullError) as info:
        store.save_capture(spare)
    _assert_full(info, "disk full while committing the capture", ADVICE, sqlite_full=True)
    assert _free_pages(small_disk) >= image_pages  # its files are gone again
    assert _files(store) == files_before
    assert _reads(store, ids, cell_id) == before  # nothing changed by any refused write
    assert _integrity(data / DB_FILE) == "ok"

    # -- a process started while the disk is full (a service restart) can still read --------------
    store.close()
    fresh.close()
    del store, fresh
    gc.collect()
    _fill(small_disk / "filler2")
    proc = subprocess.run(
        [sys.executable, "-c", READER, str(data)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["count"] == 3 and seen["slides"] == before["slide_ids"]
    assert seen["search"] == json.loads(json.dumps(before["search"]))

    # -- space again: intact, and writes work -----------------------------------------------------
    filler.unlink()
    (small_disk / "filler2").unlink()
    store = Store(data, min_free_mb=0)
    assert _reads(store, ids, cell_id) == before
    assert _integrity(data / DB_FILE) == "ok"
    new_id = store.save_capture(_record(seed=11, cells=(_cell(5, True, True),)))
    store.add_review(cell_id, "normal", "bob")
    store.ensure_slide("slide-NEW")
    store.mark_slide_reviewed("slide-A", by="alice", confirm_unreviewed=store.slide_summary("slide-A")["unreviewed"])
    store.attach_field_image(ids[1], spare.field_jpeg)
    assert store.count_captures() == 4 and store.get_capture(new_id)["n_cells"] == 1
    assert [r["reviewer"] for r in store.review_history(cell_id=cell_id)] == ["alice", "bob"]
    assert "slide-NEW" in store.slide_ids() and store.slide_summary("slide-A")["reviewed_by"] == "alice"
    assert store.reconcile(min_age_s=0).clean  # the refused captures left nothing behind
    assert _integrity(data / DB_FILE) == "ok"
    store.close()


def test_reconcile_on_a_full_disk_reports_and_moves_nothing(small_disk):
    data = small_disk / "data"
    store = Store(data, min_free_mb=0)
    store.save_capture(_record(seed=1))
    orphan = store.images_dir / "2026/01/01" / ("ab" * 16)
    orphan.mkdir(parents=True)
    (orphan / "field.jpg").write_bytes(b"jpg")
    filler = _fill(small_disk / "filler")
    report = store.reconcile(min_age_s=0)  # no room for the quarantine's README: leave it, do not raise
    assert report.quarantined == () and report.left_in_place == ("2026/01/01/" + "ab" * 16,)
    assert "not moved: the disk is full" in report.summary()
    assert (orphan / "field.jpg").read_bytes() == b"jpg"
    assert not any((data / "quarantine").glob("*"))  # no half-made quarantine folder either
    filler.unlink()
    assert store.reconcile(min_age_s=0).quarantined == ("2026/01/01/" + "ab" * 16,)
    store.close()


def test_leftovers_on_another_file_system_are_left_in_place_not_copied(tmp_path):
    store = Store(tmp_path / "data", min_free_mb=0)
    year = store.images_dir / "2026"
    _mount(year, "size=1m")  # images/2026 on its own file system: a rename cannot leave it
    try:
        orphan = year / "01/01" / ("ab" * 16)
        orphan.mkdir(parents=True)
        (orphan / "field.jpg").write_bytes(b"jpg")
        report = store.reconcile(min_age_s=0)
        assert report.quarantined == () and report.left_in_place == ("2026/01/01/" + "ab" * 16,)
        assert "another file system" in report.summary() and "nothing was deleted" in report.summary()
        assert (orphan / "field.jpg").read_bytes() == b"jpg"
        assert not any((store.data_dir / "quarantine").rglob("*"))  # no empty quarantine folder left behind
    finally:
        _umount(year)
        store.close()


# -- a data folder that cannot be written -----------------------------------------------------------


def test_read_only_data_dir_is_refused_saying_what_to_do(tmp_path):
    mnt = tmp_path / "ro"
    _mount(mnt, "ro,size=1m")
    try:
        for data in (mnt, mnt / "data"):  # an existing folder, and one that cannot be created
            with pytest.raises(StoreError) as info:
                Store(data)
            msg = str(info.value)
            assert "store.data_dir" in msg and str(data) in msg
            assert "not writable by user" in msg and "read-only file system" in msg and "choose another folder" in msg
    finally:
        _umount(mnt)


def test_store_on_a_read_only_bind_mount_is_refused(tmp_path):
    data = tmp_path / "data"
    store = Store(data, min_free_mb=0)
    store.save_capture(_record(seed=1))
    store.close()
    mnt = tmp_path / "ro"
    mnt.mkdir()
    bind = subprocess.run(["mount", "--bind", str(data), str(mnt)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"bind mounts are not permitted here (needs root): {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        before = sorted(p.name for p in data.iterdir())
        with pytest.raises(StoreError, match="not writable by user") as info:
            Store(mnt)
        assert "store.data_dir" in str(info.value) and str(mnt) in str(info.value)
        assert sorted(p.name for p in data.iterdir()) == before
    finally:
        _umount(mnt)
    assert Store(data).count_captures() == 1  # the store itself is fine
