"""Tests for the results store (device/store.py).

Everything runs against a real SQLite file and real image files in tmp_path.
The power-cut test kills a real writer process with SIGKILL while it saves
captures, several times, and then checks that the database is intact, that
every committed row has whole, decodable files, and that reconcile moves the
leftovers into quarantine (content intact, nothing deleted). Monkeypatching is used
only to make the disk fill up in the middle of a capture and to stop a capture just
before its commit. A real full disk (a small tmpfs) is in tests/test_full_disk.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest

import device.imaging
import device.store
import device.store.base
import device.store.captures
import device.store.files
from device.errors import LeukoCamError, NotFoundError, StoreError, StoreFullError
from device.imaging import decode_image, encode_image
from device.store import (
    DB_FILE,
    IMAGES_DIR,
    SCHEMA_VERSION,
    CaptureRecord,
    CellRecord,
    Store,
)

REPO = Path(__file__).resolve().parents[1]


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _cell(seed: int, positive: bool, needs_review: bool) -> CellRecord:
    return CellRecord(
        box=(10 + seed, 20, 60 + seed, 70),
        probability=0.9 if positive else 0.2,
        logit=2.2 if positive else -1.4,
        label="blast" if positive else "normal",
        positive=positive,
        needs_review=needs_review,
        crop_png=encode_image(_rgb(16, 16, seed), "PNG"),
        heatmap_jpeg=encode_image(_rgb(16, 16, seed + 100), "JPEG"),
    )


def _record(seed: int = 0, cells: tuple[CellRecord, ...] | None = None, message: str = "") -> CaptureRecord:
    if cells is None:
        cells = (_cell(seed + 1, positive=True, needs_review=False), _cell(seed + 2, positive=False, needs_review=True))
    return CaptureRecord(
        slide_id="slide-A",
        source="replay:field_01.jpg",
        trigger="test",
        status="ok",
        message=message,
        width=40,
        height=30,
        um_per_px=0.1,
        model_sha256="ab" * 32,
        model_synthetic=True,
        field_jpeg=encode_image(_rgb(30, 40, seed), "JPEG"),
        qc={"focus": 12.5, "clipped": 0.01},
        timings={"total_ms": 42.0},
        camera={"backend": "replay"},
        cells=cells,
    )


def _files(store: Store) -> dict[str, bytes]:
    """Every file under images/, relative path -> content."""
    return {str(p.relative_to(store.images_dir)): p.read_bytes() for p in store.images_dir.rglob("*") if p.is_file()}


@contextmanager
def _db(store: Store) -> Iterator[sqlite3.Connection]:
    """A plain connection to the store's database, committed and closed afterwards."""
    conn = sqlite3.connect(store.db_path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def _row_count(store: Store, table: str) -> int:
    with _db(store) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608


@pytest.fixture()
def store(tmp_path) -> Store:
    return Store(tmp_path / "data", min_free_mb=0)


# -- save and read back -------------------------------------------------------------------------


def test_save_and_read_back_a_capture(store):
    rec = _record(seed=1)
    cid = store.save_capture(rec)
    assert store.count_captures() == 1

    cap = store.get_capture(cid)
    assert cap["id"] == cid
    assert cap["slide_id"] == "slide-A" and cap["status"] == "ok" and cap["trigger"] == "test"
    assert (cap["width"], cap["height"], cap["um_per_px"]) == (40, 30, 0.1)
    assert cap["model_synthetic"] is True
    assert cap["qc"] == {"focus": 12.5, "clipped": 0.01}
    assert cap["timings"]["total_ms"] == 42.0 and cap["timings"]["store"] > 0 and cap["camera"] == {"backend": "replay"}
    assert len(cap["uid"]) == 32
    assert cap["n_cells"] == 2
    first, second = cap["cells"]
    assert [c["idx"] for c in cap["cells"]] == [0, 1]
    assert first["box"] == [12, 20, 62, 70] and second["box"] == [13, 20, 63, 70]
    assert first["positive"] is True and first["needs_review"] is False and first["label"] == "blast"
    assert second["positive"] is False and second["needs_review"] is True
    assert first["probability"] == pytest.approx(0.9) and second["logit"] == pytest.approx(-1.4)

    # the files are on disk with exactly the bytes given, in one folder per capture
    folder = store.images_dir / Path(cap["field_file"]).parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "cell_000.png",
        "cell_000_cam.jpg",
        "cell_001.png",
        "cell_001_cam.jpg",
        "field.jpg",
    ]
    assert (store.images_dir / cap["field_file"]).read_bytes() == rec.field_jpeg
    for c, cell in zip(cap["cells"], rec.cells, strict=True):
        assert (store.images_dir / c["crop_file"]).read_bytes() == cell.crop_png
        assert (store.images_dir / c["heatmap_file"]).read_bytes() == cell.heatmap_jpeg
    assert store.reconcile().clean


def test_recent_captures_counts_and_order(store):
    first = store.save_capture(_record(seed=1))
    empty = store.save_capture(_record(seed=2, cells=()))
    three = store.save_capture(
        _record(seed=3, cells=(_cell(1, True, True), _cell(2, True, False), _cell(3, False, False)))
    )

    recent = store.recent_captures()
    assert [c["id"] for c in recent] == [three, empty, first]  # newest first
    counts = {c["id"]: (c["n_cells"], c["n_positive"], c["n_review"]) for c in recent}
    assert counts == {first: (2, 1, 1), empty: (0, 0, 0), three: (3, 2, 1)}
    assert recent[0]["qc"] == {"focus": 12.5, "clipped": 0.01}  # JSON columns decoded
    assert [c["id"] for c in store.recent_captures(limit=1, offset=1)] == [empty]
    assert store.count_captures() == 3
    assert store.get_capture(empty)["cells"] == []


def test_get_capture_unknown_id_is_none(store):
    assert store.get_capture(1) is None
    store.save_capture(_record())
    assert store.get_capture(999) is None


def test_image_file_resolves_by_id(store):
    rec = _record(seed=4)
    cid = store.save_capture(rec)
    cells = store.get_capture(cid)["cells"]

    field_path = store.image_file("field", cid)
    assert field_path.is_file() and field_path.read_bytes() == rec.field_jpeg
    np.testing.assert_array_equal(decode_image(field_path).shape, (30, 40, 3))
    for c, cell in zip(cells, rec.cells, strict=True):
        assert store.image_file("crop", c["id"]).read_bytes() == cell.crop_png
        assert store.image_file("heatmap", c["id"]).read_bytes() == cell.heatmap_jpeg

    assert store.image_file("thumbnail", cid) is None
    assert store.image_file("field", cid + 1) is None
    assert store.image_file("crop", 9999) is None
    assert store.image_file("heatmap", -1) is None


def test_image_file_refuses_a_path_outside_the_images_folder(store):
    cid = store.save_capture(_record())
    (store.data_dir / "secret.txt").write_text("not an image")
    with _db(store) as conn:
        conn.execute("UPDATE captures SET field_file = '../secret.txt' WHERE id = ?", (cid,))
    assert store.image_file("field", cid) is None


# -- schema, WAL and migrations -------------------------------------------------------------------


def test_database_is_wal_with_current_schema_version(store):
    with _db(store) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"captures", "cells"} <= tables
    assert store.db_path == store.data_dir / DB_FILE
    assert store.images_dir == store.data_dir / IMAGES_DIR and store.images_dir.is_dir()


def test_queries_use_read_only_connections_and_wal_is_set_once(store, tmp_path):
    store.save_capture(_record())
    with store.read() as conn:  # SQLite itself refuses any write on the path that queries take
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM captures")
    assert store.count_captures() == 1
    statements = []
    with store.connect() as conn:
        conn.set_trace_callback(statements.append)
        conn.execute("SELECT 1").fetchall()
    assert not any("journal_mode" in s for s in statements)
    # the mode lives in the database file: a plain connection that sets nothing finds it
    with _db(store) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_data_and_schema(tmp_path):
    data = tmp_path / "data"
    cid = Store(data, min_free_mb=0).save_capture(_record(seed=5))
    with closing(sqlite3.connect(data / DB_FILE)) as conn:
        schema_before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()

    for _ in range(2):  # migrations are idempotent
        again = Store(data, min_free_mb=0)
        assert again.count_captures() == 1
        assert again.get_capture(cid)["n_cells"] == 2
    with closing(sqlite3.connect(data / DB_FILE)) as conn:
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema_before
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert again.save_capture(_record(seed=6)) == cid + 1


def test_migration_to_version_5_leaves_older_cells_unchecked_for_repeats(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with closing(sqlite3.connect(data / DB_FILE)) as conn:
        for step in device.store.MIGRATIONS[:4]:
            conn.executescript(step)
        conn.execute("PRAGMA user_version=4")
        conn.execute(
            """INSERT INTO captures (id, uid, created_at, slide_id, source, trigger, status, width, height,
               model_sha256, field_file, bytes)
               VALUES (1, 'u1', '2025-01-01T00:00:00', 'OLD', 's', 'test', 'ok', 40, 30, 'sha', 'f/field.jpg', 0)"""
        )
        conn.execute(
            """INSERT INTO cells (capture_id, idx, x0, y0, x1, y1, probability, logit, label, positive, needs_review,
               crop_file, heatmap_file) VALUES (1, 0, 0, 0, 50, 50, 0.9, 2.0, 'blast', 1, 1, 'a.png', 'a.jpg')"""
        )
        conn.execute("INSERT INTO slides (id, created_at) VALUES ('OLD', '2025-01-01T00:00:00')")
        conn.commit()
    store = Store(data, min_free_mb=0)
    cap = store.get_capture(1)
    assert cap["cam_scale"] is None and cap["cells"][0]["duplicate_of"] is None
    with _db(store) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert conn.execute("SELECT dhash FROM cells").fetchone()[0] is None  # NULL: never checked
    # A new cell with any hash never matches a cell that was stored unchecked.
    rec = dataclasses.replace(_record(seed=1, cells=(dataclasses.replace(_cell(1, True, False), dhash=0xFF),)))
    new_id = store.save_capture(dataclasses.replace(rec, slide_id="OLD"))
    assert store.get_capture(new_id)["cells"][0]["duplicate_of"] is None
    s = store.slide_summary("OLD")
    assert (s["cells"], s["needs_review"], s["duplicates"]) == (2, 1, 0)


def test_a_cell_stored_again_in_a_slide_is_marked_a_repeat_and_counted_once(store):
    near = 0x0F0F_3C3C_F0F0_AAAA
    first = store.save_capture(
        _record(
            seed=1,
            cells=(
                dataclasses.replace(_cell(1, True, True), dhash=near),
                dataclasses.replace(_cell(2, False, False), dhash=0x1234_5678_9ABC_DEF0),
            ),
        )
    )
    a, b = (c["id"] for c in store.get_capture(first)["cells"])
    again = _record(
        seed=2,
        cells=(
            dataclasses.replace(_cell(3, True, True), dhash=near ^ 0b1011),  # 3 bits off: close, but cell 4 is closer
            dataclasses.replace(_cell(4, False, False), dhash=near ^ 0b1),  # 1 bit off, same box size: repeats a
            dataclasses.replace(_cell(5, False, False), dhash=0x1234_5678_9ABC_DEF0, box=(0, 0, 200, 200)),  # size
            dataclasses.replace(_cell(6, True, False), dhash=near ^ 0b11111),  # 5 bits off: another cell
            _cell(7, False, False),  # no hash: not checked
        ),
    )
    second = store.save_capture(again)
    assert [c["duplicate_of"] for c in store.get_capture(second)["cells"]] == [None, a, None, None, None]
    assert "dhash" not in store.get_capture(second)["cells"][0]
    other_slide = store.save_capture(dataclasses.replace(again, slide_id="slide-B"))
    assert all(c["duplicate_of"] is None for c in store.get_capture(other_slide)["cells"])
    # A third copy points at the first cell, never at a repeat.
    third = store.save_capture(_record(seed=3, cells=(dataclasses.replace(_cell(8, True, False), dhash=near),)))
    assert store.get_capture(third)["cells"][0]["duplicate_of"] == a
    s = store.slide_summary("slide-A")
    assert (s["cells"], s["duplicates"], s["positive"]) == (6, 2, 3)  # 2 + 5 + 1 stored, 2 of them repeats
    assert len(store.slide_cells("slide-A")) == 6 and len(store.slide_cells("slide-A", include_duplicates=True)) == 8
    # Reviewing either copy reviews the cell: its repeats are neither pending nor unreviewed.
    assert (s["needs_review"], s["unreviewed"]) == (2, 6)  # a and cell 3 flagged
    repeat = store.get_capture(second)["cells"][1]["id"]
    store.add_review(repeat, "normal", "alice")
    s = store.slide_summary("slide-A")
    assert (s["needs_review"], s["unreviewed"]) == (1, 5)
    verdicts = {c["cell_id"]: c["verdict"] for c in store.slide_cells("slide-A")}
    assert verdicts[a] == "normal" and b in verdicts
    assert store.current_reviews(first)[a]["cell_id"] == repeat
    assert store.current_reviews(third)[store.get_capture(third)["cells"][0]["id"]]["label"] == "normal"
    rows = {c["id"]: c for c in store.search_captures(slide_id="slide-A")[1]}
    assert (rows[first]["n_reviewed"], rows[second]["n_reviewed"], rows[third]["n_reviewed"]) == (1, 1, 1)
    assert rows[second]["n_duplicates"] == 1 and rows[third]["n_duplicates"] == 1


def test_newer_schema_is_refused_with_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with closing(sqlite3.connect(data / DB_FILE)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this LeukoCam") as info:
        Store(data)
    assert "upgrade LeukoCam" in str(info.value)
    with closing(sqlite3.connect(data / DB_FILE)) as conn:  # and it did not touch the database
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0


# -- full disk ------------------------------------------------------------------------------------


def test_full_disk_before_writing_refuses_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    old = Store(data, min_free_mb=0)
    old.save_capture(_record(seed=7))
    before = _files(old)

    full = Store(data, min_free_mb=10**12)  # more than any disk has free
    with pytest.raises(StoreFullError, match="nothing was written") as info:
        full.save_capture(_record(seed=8))
    assert "MB free" in str(info.value)
    assert full.count_captures() == 1
    assert _row_count(full, "cells") == 2
    assert _files(full) == before
    with pytest.raises(StoreFullError):
        full.check_space()
    old.check_space()  # min_free_mb=0 passes


def test_check_space_counts_the_payload(store):
    store.min_free_mb = int(store.free_mb()) - 1000  # about 1 GB of headroom
    store.check_space(need_bytes=0)
    with pytest.raises(StoreFullError):
        store.check_space(need_bytes=10**15)  # a payload no disk has room for


class _FillsUp:
    """Wraps the write of one temp file (device.imaging._write_temp): the n-th call fails as a full disk would."""

    def __init__(self, fail_on: int, err: int = errno.ENOSPC):
        self.fail_on, self.err, self.paths = fail_on, err, []
        self.real = device.imaging._write_temp

    def __call__(self, path, data):
        self.paths.append(Path(path))
        if len(self.paths) == self.fail_on:
            raise OSError(self.err, os.strerror(self.err), str(path))
        return self.real(path, data)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("fail_on", [1, 2, 5])
def test_disk_fills_during_the_write(store, monkeypatch, err, fail_on):
    kept = _record(seed=9)
    kept_id = store.save_capture(kept)
    before = _files(store)

    fills = _FillsUp(fail_on, err)
    monkeypatch.setattr(device.imaging, "_write_temp", fills)
    with pytest.raises(StoreFullError, match="partial files removed"):
        store.save_capture(_record(seed=10))
    monkeypatch.undo()

    assert len(fills.paths) == fail_on
    assert not fills.paths[0].parent.exists()  # the capture's own folder is gone
    assert store.count_captures() == 1 and _row_count(store, "cells") == 2
    assert _files(store) == before  # earlier captures byte-identical, nothing new
    cap = store.get_capture(kept_id)
    assert decode_image(store.images_dir / cap["field_file"]).shape == (30, 40, 3)
    report = store.reconcile()
    assert report.orphan_dirs == () and report.missing_files == () and report.temp_files == ()


def test_a_rename_failing_part_way_leaves_no_part_of_the_capture(store, monkeypatch):
    # The first images are already under their names when the third rename fails: the capture's folder goes.
    kept_id = store.save_capture(_record(seed=9))
    before = _files(store)
    real, calls = os.replace, []

    def replace_fails_third(src, dst):
        calls.append(Path(dst))
        if len(calls) == 3:
            raise OSError(errno.EIO, "simulated I/O error during rename")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_third)
    with pytest.raises(OSError, match="rename"):
        store.save_capture(_record(seed=10))
    monkeypatch.undo()
    assert len(calls) == 3 and not calls[0].parent.exists()
    assert store.count_captures() == 1 and _files(store) == before
    assert store.get_capture(kept_id) is not None
    report = store.reconcile()
    assert report.orphan_dirs == () and report.missing_files == () and report.temp_files == ()


def test_other_write_errors_are_not_reported_as_full(store, monkeypatch):
    fills = _FillsUp(2, errno.EIO)
    monkeypatch.setattr(device.imaging, "_write_temp", fills)
    with pytest.raises(OSError) as info:
        store.save_capture(_record())
    assert not isinstance(info.value, StoreFullError) and info.value.errno == errno.EIO
    assert not fills.paths[0].parent.exists()
    assert store.count_captures() == 0


def test_database_full_at_commit_refuses_and_removes_files(store, monkeypatch):
    kept_id = store.save_capture(_record(seed=11))
    before = _files(store)
    real_connect = store.connect

    @contextmanager
    def capped_connect():
        # A real SQLITE_FULL: the database may not grow beyond its current size.
        with real_connect() as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
            yield conn

    monkeypatch.setattr(store, "connect", capped_connect)
    with pytest.raises(StoreFullError, match="disk full while committing"):
        store.save_capture(_record(seed=12, message="x" * 200_000))  # needs new pages
    monkeypatch.undo()

    assert store.count_captures() == 1
    assert _files(store) == before
    assert store.get_capture(kept_id)["n_cells"] == 2


# -- power cut -------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from device.imaging import encode_image
    from device.store import CaptureRecord, CellRecord, Store

    store = Store(sys.argv[1], min_free_mb=0)
    rng = np.random.default_rng(int(sys.argv[2]))

    def png(h, w):
        return encode_image(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "PNG")

    while True:
        cells = tuple(
            CellRecord(box=(i, i, i + 8, i + 8), probability=0.5, logit=0.0, label="normal",
                       positive=bool(i % 2), needs_review=False, crop_png=png(24, 24), heatmap_jpeg=png(24, 24))
            for i in range(3)
        )
        store.save_capture(CaptureRecord(
            slide_id="power-cut", source="test", trigger="loop", status="ok", message="",
            width=64, height=48, um_per_px=None, model_sha256="0" * 64, model_synthetic=True,
            field_jpeg=encode_image(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)),
            cells=cells,
        ))
    """
)


def _wait_for(store: Store, count: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while store.count_captures() < count:
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"writer did not reach {count} captures in {timeout} s")
        time.sleep(0.01)


def _cut_power(store: Store, data: Path, writer: str, round_no: int, at_least: int, rnd: random.Random) -> None:
    """Run a writer process on the store at data until it holds at_least captures, then SIGKILL it somewhere
    inside a later capture (a power cut)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, str(data), str(round_no)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(store, at_least, proc)
        time.sleep(rnd.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_consistent(store: Store) -> None:
    with _db(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        orphan_cells = conn.execute(
            "SELECT COUNT(*) FROM cells WHERE capture_id NOT IN (SELECT id FROM captures)"
        ).fetchone()[0]
        assert orphan_cells == 0
    for cap in store.recent_captures(limit=10_000):
        assert cap["n_cells"] == 3  # a capture is committed with all its cells or not at all
        full = store.get_capture(cap["id"])
        assert decode_image(store.image_file("field", cap["id"])).shape == (48, 64, 3)
        for cell in full["cells"]:
            assert decode_image(store.image_file("crop", cell["id"])).shape == (24, 24, 3)
            assert decode_image(store.image_file("heatmap", cell["id"])).shape == (24, 24, 3)


POWER_CUTS = 100 if os.environ.get("LEUKOCAM_SOAK") == "1" else 3
"""SIGKILLs of the writer per run: `make soak` does the hostile test's 100."""


def test_power_cut_while_saving_keeps_the_store_consistent(tmp_path):
    data = tmp_path / "data"
    store = Store(data, min_free_mb=0)  # migrate before the writer starts
    rnd = random.Random(20260101)
    for round_no in range(POWER_CUTS):
        _cut_power(store, data, WRITER, round_no, store.count_captures() + 5, rnd)
        _assert_consistent(store)

    assert store.count_captures() >= 5 * POWER_CUTS
    files_before = _files(store)
    committed = store.count_captures()
    report = store.reconcile(min_age_s=0)
    assert report.missing_files == ()
    # whatever it found is a leftover of an interrupted capture: moved into quarantine, content intact
    for rel in report.orphan_dirs:
        assert "/" in rel and len(Path(rel).name) == 32  # YYYY/MM/DD/<uid>
    for rel in report.temp_files:
        assert rel.endswith(".tmp")
    leftovers = {
        rel: data
        for rel, data in files_before.items()
        if rel in report.temp_files or any(rel.startswith(d + "/") for d in report.orphan_dirs)
    }
    assert set(report.temp_files) <= set(leftovers)
    assert report.left_in_place == ()
    if report.orphan_dirs or report.temp_files:
        assert _quarantined(report) == leftovers
        assert f"moved {len(report.orphan_dirs)} image folder(s)" in report.summary()
        assert report.quarantine_dir in report.summary() and "nothing was deleted" in report.summary()
    else:
        assert report.clean and report.quarantine_dir == ""
    assert _files(store) == {rel: data for rel, data in files_before.items() if rel not in leftovers}
    # 0 committed captures lost, every one whole; and the next start-up finds nothing
    assert store.count_captures() == committed
    _assert_consistent(store)
    assert store.reconcile(min_age_s=0).clean
    # and the store still takes new captures after the crashes
    cid = Store(data, min_free_mb=0).save_capture(_record(seed=13))
    assert store.get_capture(cid)["n_cells"] == 2


LATE_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from device.imaging import encode_image
    from device.store import CaptureRecord, CellRecord, Store

    store = Store(sys.argv[1], min_free_mb=0)
    rng = np.random.default_rng(int(sys.argv[2]))

    def png(h, w):
        return encode_image(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "PNG")

    while True:  # as the appliance stores: the result, then its crop PNGs, then its field JPEG
        cells = tuple(
            CellRecord(box=(i, i, i + 8, i + 8), probability=0.5, logit=0.0, label="normal", positive=False,
                       needs_review=False, crop_png=None, heatmap_jpeg=png(24, 24), crop_nbytes=24 * 24 * 3)
            for i in range(3)
        )
        cid = store.save_capture(CaptureRecord(
            slide_id="power-cut", source="test", trigger="loop", status="ok", message="",
            width=64, height=48, um_per_px=None, model_sha256="0" * 64, model_synthetic=True,
            field_jpeg=None, cells=cells,
        ))
        store.attach_cell_crops(cid, [png(24, 24) for _ in range(3)])
        store.attach_field_image(cid, encode_image(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)))
    """
)


def test_power_cut_between_a_result_and_its_archival_copies_loses_only_those_copies(tmp_path):
    # The appliance commits a result (rows and heatmaps), then writes the crop PNGs and the field JPEG. A power
    # cut in between may lose those copies of the last capture, never a result, and never leaves half a file.
    data = tmp_path / "data"
    store = Store(data, min_free_mb=0)
    rnd = random.Random(20261127)
    for round_no in range(max(POWER_CUTS, 5)):
        _cut_power(store, data, LATE_WRITER, round_no, store.count_captures() + 3, rnd)
    committed = store.count_captures()
    late = {"field": 0, "crop": 0}
    for cap in store.recent_captures(limit=10_000):
        full = store.get_capture(cap["id"])
        assert full["n_cells"] == 3  # a result is committed whole
        for cell in full["cells"]:
            assert decode_image(store.image_file("heatmap", cell["id"])).shape == (24, 24, 3)
            crop = store.image_file("crop", cell["id"])
            late["crop"] += not crop.is_file()
            assert not crop.is_file() or decode_image(crop).shape == (24, 24, 3)  # whole, or not there
        field = store.image_file("field", cap["id"])
        late["field"] += not field.is_file()
        assert not field.is_file() or decode_image(field).shape == (48, 64, 3)
    report = store.reconcile(min_age_s=0)
    assert all(f.endswith((".png", "field.jpg")) and not f.endswith("_cam.jpg") for f in report.missing_files)
    assert len(report.missing_files) == late["crop"] + late["field"]
    # at most the copies of the capture each cut interrupted
    assert late["field"] <= max(POWER_CUTS, 5) and late["crop"] <= 3 * max(POWER_CUTS, 5)
    assert store.count_captures() == committed >= 3 * max(POWER_CUTS, 5)


def _quarantined(report) -> dict[str, bytes]:
    """Every file moved into the report's quarantine folder, by its old path relative to images/ -> content."""
    moved = Path(report.quarantine_dir) / IMAGES_DIR
    return {str(p.relative_to(moved)): p.read_bytes() for p in moved.rglob("*") if p.is_file()}


def _age(path: Path, seconds: float) -> None:
    """Make path (and everything in it) look last changed `seconds` ago."""
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when))


class _PowerCut(BaseException):
    """Stands for the process dying: nothing after it runs, no cleanup code catches it."""


def test_crash_leftovers_are_moved_into_quarantine_not_deleted(store, monkeypatch):
    kept_id = store.save_capture(_record(seed=14))

    @contextmanager
    def dies():
        raise _PowerCut
        yield  # pragma: no cover

    monkeypatch.setattr(store, "connect", dies)
    with pytest.raises(_PowerCut):
        store.save_capture(_record(seed=15))
    monkeypatch.undo()

    # by hand: another capture folder without a row, and a half-written temp file in a committed folder
    hand = "2026/01/01/" + "ab" * 16
    hand_dir = store.images_dir / hand
    hand_dir.mkdir(parents=True)
    (hand_dir / "field.jpg").write_bytes(encode_image(_rgb(8, 8, 0)))
    kept_dir = store.images_dir / Path(store.get_capture(kept_id)["field_file"]).parent
    temp = kept_dir / ".cell_000.png.x.tmp"
    temp.write_bytes(b"\x89PNG half")
    temp_rel = str(temp.relative_to(store.images_dir))
    files_before = _files(store)
    bytes_before = store.images_bytes()

    # Just written: they might belong to a capture another process is committing right now. Left for later.
    early = store.reconcile()
    assert len(early.orphan_dirs) == 2 and early.temp_files == (temp_rel,)
    assert early.quarantined == () and len(early.left_in_place) == 3
    assert "left in place" in early.summary() and "nothing was deleted" in early.summary()
    assert _files(store) == files_before and not (store.data_dir / "quarantine").exists()

    report = store.reconcile(min_age_s=0)
    assert store.count_captures() == 1
    assert len(report.orphan_dirs) == 2 and hand in report.orphan_dirs
    crashed = next(d for d in report.orphan_dirs if d != hand)
    assert report.temp_files == (temp_rel,)
    assert report.missing_files == () and report.left_in_place == ()
    assert set(report.quarantined) == {hand, crashed, temp_rel}
    assert not report.clean
    # moved to <data_dir>/quarantine/<UTC time>/, keeping their paths relative to the data folder
    quarantine = Path(report.quarantine_dir)
    assert quarantine.parent == store.data_dir / "quarantine" and re.fullmatch(r"\d{8}T\d{6}Z", quarantine.name)
    summary = report.summary()
    assert "moved 2 image folder(s) without a capture row and 1 interrupted temp file(s)" in summary
    assert str(quarantine) in summary and "nothing was deleted" in summary and "\n" not in summary
    leftovers = {rel: data for rel, data in files_before.items() if rel.startswith((hand, crashed)) or rel == temp_rel}
    assert sorted(Path(rel).name for rel in leftovers if rel.startswith(crashed)) == [
        "cell_000.png",
        "cell_000_cam.jpg",
        "cell_001.png",
        "cell_001_cam.jpg",
        "field.jpg",
    ]
    assert _quarantined(report) == leftovers  # content intact
    readme = (quarantine / "README.txt").read_text()
    assert "restore" in readme and all(f"images/{rel}" in readme for rel in report.quarantined)
    # the committed capture is untouched, and the quarantine does not count as stored images
    assert _files(store) == {rel: data for rel, data in files_before.items() if rel not in leftovers}
    cap = store.get_capture(kept_id)
    assert decode_image(store.images_dir / cap["field_file"]).shape == (30, 40, 3)
    assert store.images_bytes() == bytes_before
    # later start-ups report nothing: the status clears
    again = store.reconcile(min_age_s=0)
    assert again.clean and again.summary() == "store consistent"
    # restoring as the README says puts the files back whole (and, still without a row, they are leftovers again)
    (store.images_dir / hand).parent.mkdir(parents=True, exist_ok=True)
    os.replace(quarantine / IMAGES_DIR / hand, store.images_dir / hand)
    assert (store.images_dir / hand / "field.jpg").read_bytes() == files_before[hand + "/field.jpg"]
    assert store.reconcile(min_age_s=0).orphan_dirs == (hand,)


def test_leftovers_older_than_a_capture_are_moved_at_start_up_by_default(store):
    kept_id = store.save_capture(_record(seed=20))
    old = store.images_dir / "2025/12/31" / ("cd" * 16)
    old.mkdir(parents=True)
    (old / "cell_000.png").write_bytes(b"png")
    fresh = store.images_dir / "2026/01/02" / ("ef" * 16)
    fresh.mkdir(parents=True)
    (fresh / "field.jpg").write_bytes(b"jpg")
    _age(old, 3600)
    report = store.reconcile()  # as the service runs it at start-up
    assert report.quarantined == ("2025/12/31/" + "cd" * 16,)
    assert report.left_in_place == ("2026/01/02/" + "ef" * 16,)
    assert "moved 1 to" in report.summary() and "left 1 in place" in report.summary()
    assert fresh.is_dir() and not old.exists()
    assert store.get_capture(kept_id)["n_cells"] == 2


def test_reconcile_that_cannot_quarantine_reports_and_moves_nothing(store):
    orphan = store.images_dir / "2026/01/01" / ("ab" * 16)
    orphan.mkdir(parents=True)
    (orphan / "field.jpg").write_bytes(b"jpg")
    (store.data_dir / "quarantine").write_text("a file where the quarantine folder goes")
    report = store.reconcile(min_age_s=0)  # does not raise: start-up goes on
    assert report.quarantined == () and report.left_in_place == ("2026/01/01/" + "ab" * 16,)
    assert "left in place (not moved:" in report.summary()
    assert (orphan / "field.jpg").read_bytes() == b"jpg"


def test_capture_whose_files_were_quarantined_before_its_commit_is_not_stored(store, monkeypatch):
    # Another process starting up (reconcile) while this one is between writing files and committing.
    real = device.store.captures.write_capture_files

    def write_then_reconcile(*args):
        written = real(*args)
        assert store.reconcile(min_age_s=0).quarantined  # the uncommitted folder looks like a leftover
        return written

    monkeypatch.setattr(device.store.captures, "write_capture_files", write_then_reconcile)
    with pytest.raises(StoreError, match="moved into quarantine"):
        store.save_capture(_record(seed=21))
    monkeypatch.undo()
    assert store.count_captures() == 0  # no row points at files that are not there
    assert store.reconcile(min_age_s=0).clean


def test_reconcile_reports_missing_files(store):
    cid = store.save_capture(_record(seed=16))
    cap = store.get_capture(cid)
    (store.images_dir / cap["cells"][1]["heatmap_file"]).unlink()
    report = store.reconcile()
    assert report.missing_files == (cap["cells"][1]["heatmap_file"],)
    assert report.orphan_dirs == () and report.temp_files == ()
    assert "1 missing file(s)" in report.summary()
    assert store.reconcile().summary() == report.summary()


def test_crops_written_after_the_result_are_attached_in_cell_order(store):
    # The appliance stores a result first and writes the archival crop PNGs just after it (as the field JPEG):
    # until then the crops are missing files, reserved by the space check; then they are whole and counted.
    crops = [encode_image(_rgb(16, 16, s), "PNG") for s in (31, 32)]
    pending = tuple(dataclasses.replace(c, crop_png=None, crop_nbytes=16 * 16 * 3) for c in _record(seed=30).cells)
    rec = dataclasses.replace(_record(seed=30), cells=pending)
    cid = store.save_capture(rec)
    cap = store.get_capture(cid)
    names = [c["crop_file"] for c in cap["cells"]]
    assert store.reconcile().missing_files == tuple(names)
    with pytest.raises(StoreError, match="2 cell"):
        store.attach_cell_crops(cid, crops[:1])
    store.attach_cell_crops(cid, crops)
    assert [store.image_file("crop", c["id"]).read_bytes() for c in cap["cells"]] == crops
    assert store.reconcile(min_age_s=0).clean
    assert store.images_bytes() == sum(p.stat().st_size for p in store.images_dir.rglob("*") if p.is_file())
    empty = store.save_capture(dataclasses.replace(_record(seed=33), cells=()))
    store.attach_cell_crops(empty, [])  # a field without cells has nothing to attach
    # The space check counts a crop still to come at its raw size.
    store.min_free_mb = 0
    free = shutil.disk_usage(store.data_dir).free
    huge = tuple(dataclasses.replace(c, crop_nbytes=free) for c in pending)
    with pytest.raises(StoreFullError):
        store.save_capture(dataclasses.replace(rec, cells=huge))


def test_images_of_a_capture_deleted_meanwhile_are_not_written(store, monkeypatch):
    # The archival copies follow the result; retention may delete the capture first. No write may then bring
    # its folder back (an orphan for start-up to quarantine), whether the row or the folder goes first.
    def pending(seed):
        rec = _record(seed=seed)
        cells = tuple(dataclasses.replace(c, crop_png=None, crop_nbytes=16 * 16 * 3) for c in rec.cells)
        return dataclasses.replace(rec, field_jpeg=None, cells=cells)

    def delete(cid, folder_too):
        cap = store.get_capture(cid)
        with _db(store) as conn:
            conn.execute("DELETE FROM cells WHERE capture_id = ?", (cid,))
            conn.execute("DELETE FROM captures WHERE id = ?", (cid,))
        if folder_too:
            shutil.rmtree((store.images_dir / cap["field_file"]).parent)

    crops = [encode_image(_rgb(16, 16, s), "PNG") for s in (41, 42)]
    jpeg = encode_image(_rgb(30, 40, 43), "JPEG")
    gone = store.save_capture(pending(40))
    delete(gone, folder_too=True)
    with pytest.raises(NotFoundError):
        store.attach_cell_crops(gone, crops)
    with pytest.raises(NotFoundError):
        store.attach_field_image(gone, jpeg)
    # The row goes while the files are written: they are removed again.
    racing = store.save_capture(pending(44))
    real_write = device.store.captures.atomic_write_files

    def write_then_delete(folder, files):
        real_write(folder, files)
        delete(racing, folder_too=False)

    monkeypatch.setattr(device.store.captures, "atomic_write_files", write_then_delete)
    with pytest.raises(NotFoundError, match="deleted before its cell crops"):
        store.attach_cell_crops(racing, crops)
    monkeypatch.undo()
    assert store.count_captures() == 0
    assert store.reconcile(min_age_s=0).clean
    assert not any(store.images_dir.glob("*/*/*/*"))


def test_clean_store_reconciles_clean(store):
    assert store.reconcile().clean
    store.save_capture(_record())
    report = store.reconcile()
    assert report.clean and report.summary() == "store consistent"


def test_processes_opening_a_new_store_together_migrate_once(tmp_path):
    # First boot: `serve` and `capture` may open a fresh folder at the same moment.
    code = "import sys; from device.store import Store; Store(sys.argv[1]); print('ok')"
    for trial in range(3):
        folder = tmp_path / f"fresh{trial}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
        assert Store(folder).count_captures() == 0


def _bytes_on_disk(store) -> int:
    return sum(p.stat().st_size for p in store.images_dir.rglob("*") if p.is_file())


def test_stored_bytes_are_counted_as_written_not_by_walking_the_disk(store):
    ids = [store.save_capture(_record(seed=s)) for s in range(3)]
    later = dataclasses.replace(_record(seed=7), field_jpeg=None)  # the field image follows the result
    late_id = store.save_capture(later)
    assert store.images_bytes() == _bytes_on_disk(store)
    store.attach_field_image(late_id, encode_image(_rgb(30, 40, 7), "JPEG"))
    assert store.images_bytes() == _bytes_on_disk(store)
    for cell in store.slide_cells("slide-A"):  # retention deletes only captures whose cells are all reviewed
        store.add_review(cell["cell_id"], cell["model_label"], "alice")
    store.mark_slide_reviewed("slide-A", by="alice")
    result = store.apply_retention(max_images_mb=_bytes_on_disk(store) / 2 / 1e6)
    assert result["deleted"] and set(result["deleted"]) <= set(ids + [late_id])
    assert store.images_bytes() == _bytes_on_disk(store)


def test_captures_stored_before_sizes_were_recorded_are_counted_once_at_start(tmp_path):
    store = Store(tmp_path)
    cid = store.save_capture(_record())
    with store.connect() as conn:  # as a version-3 database left it
        conn.execute("UPDATE captures SET bytes = NULL")
    reopened = Store(tmp_path)
    assert reopened.images_bytes() == _bytes_on_disk(reopened) > 0
    assert reopened.get_capture(cid)["bytes"] == _bytes_on_disk(reopened)


def test_store_stage_time_is_saved_with_the_capture(store):
    cid = store.save_capture(_record())
    timings = store.get_capture(cid)["timings"]
    assert timings["total_ms"] == 42.0 and timings["store"] > 0


# -- a data folder that cannot be used ------------------------------------------------------------


def test_data_dir_that_is_a_file_is_refused_saying_what_to_do(tmp_path):
    data = tmp_path / "data"
    data.write_text("not a folder")
    with pytest.raises(StoreError) as info:
        Store(data)
    msg = str(info.value)
    assert isinstance(info.value, LeukoCamError)  # the CLI prints it as one line, the web as a message
    assert "store.data_dir" in msg and str(data) in msg and "is a file: point store.data_dir at a folder" in msg
    assert data.read_text() == "not a folder"
    with pytest.raises(StoreError, match="is a file") as info:  # a folder inside a file
        Store(data / "sub")
    assert "store.data_dir" in str(info.value) and str(data) in str(info.value)


def test_database_that_is_not_sqlite_is_refused_and_nothing_is_moved(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    junk = b"this is not a database, it only has its name " * 100
    (data / DB_FILE).write_bytes(junk)
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(StoreError) as info:
        Store(data)
    msg = str(info.value)
    assert "store.data_dir" in msg and str(data / DB_FILE) in msg
    assert "file is not a database" in msg and "nothing was changed or moved" in msg
    assert (data / DB_FILE).read_bytes() == junk
    assert sorted(p.name for p in data.iterdir()) == before  # no -wal, -shm, images/ or renamed copy


def test_database_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / DB_FILE).mkdir()
    with pytest.raises(StoreError, match="is a folder, not the database"):
        Store(tmp_path)


def test_cli_reports_an_unusable_data_dir_in_one_line(tmp_path):
    from click.testing import CliRunner

    from device.cli import cli

    data = tmp_path / "data"
    data.write_text("not a folder")
    cfg = tmp_path / "leukocam.toml"
    cfg.write_text(f'[store]\ndata_dir = "{data}"\n')
    result = CliRunner().invoke(cli, ["capture", "--config", str(cfg), str(cfg)])
    assert result.exit_code == 2, result.output
    assert "error: store.data_dir" in result.output and "is a file" in result.output
    assert "Traceback" not in result.output


def test_data_dir_not_writable_by_the_service_user_says_chown(tmp_path, monkeypatch):
    # As root nothing is unwritable by permissions alone (read-only mounts are in test_full_disk.py),
    # so the permission check itself is made to say no here.
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(device.store.base.os, "access", lambda path, mode, **kw: Path(path) != data)
    with pytest.raises(StoreError) as info:
        Store(data)
    msg = str(info.value)
    assert "store.data_dir" in msg and str(data) in msg and "not writable by user" in msg
    assert "chown/chmod" in msg and "choose another folder" in msg
