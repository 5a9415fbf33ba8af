"""Durable results: SQLite (WAL) for rows, plain files for images.

Write order is what makes a power cut harmless: every image of a capture is
written atomically (temp file, fsync, rename) first, and only then is the
capture committed in one transaction. A crash in between leaves files without
a row, which `reconcile` reports at start-up (never deleting them silently); it
can never leave a row whose files are half written. Disk space is checked
before anything is written, so a full disk refuses a capture and loses nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from device.errors import StoreError, StoreFullError
from device.imaging import atomic_write_bytes, fsync_dir
from device.stats import wilson_ci

log = logging.getLogger(__name__)

DB_FILE = "leukocam.sqlite3"
IMAGES_DIR = "images"

# Each entry moves the schema from version i to i+1. Append; never edit a released step.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE captures (
        id INTEGER PRIMARY KEY,
        uid TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        slide_id TEXT NOT NULL,
        source TEXT NOT NULL,
        trigger TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('ok', 'retake', 'error')),
        message TEXT NOT NULL DEFAULT '',
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        um_per_px REAL,
        model_sha256 TEXT NOT NULL,
        model_synthetic INTEGER NOT NULL DEFAULT 0,
        qc_json TEXT NOT NULL DEFAULT '{}',
        timings_json TEXT NOT NULL DEFAULT '{}',
        camera_json TEXT NOT NULL DEFAULT '{}',
        field_file TEXT NOT NULL
    );
    CREATE INDEX captures_created ON captures (created_at);
    CREATE INDEX captures_slide ON captures (slide_id);
    CREATE TABLE cells (
        id INTEGER PRIMARY KEY,
        capture_id INTEGER NOT NULL REFERENCES captures (id),
        idx INTEGER NOT NULL,
        x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL, y1 INTEGER NOT NULL,
        probability REAL NOT NULL,
        logit REAL NOT NULL,
        label TEXT NOT NULL,
        positive INTEGER NOT NULL,
        needs_review INTEGER NOT NULL,
        crop_file TEXT NOT NULL,
        heatmap_file TEXT NOT NULL,
        UNIQUE (capture_id, idx)
    );
    CREATE INDEX cells_capture ON cells (capture_id);
    """,
    """
    CREATE TABLE slides (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        reviewed_at TEXT,
        reviewed_by TEXT
    );
    INSERT OR IGNORE INTO slides (id, created_at) SELECT slide_id, MIN(created_at) FROM captures GROUP BY slide_id;
    """,
    # Reviews are append-only: a cell's current verdict is its newest row. No foreign key to cells, so
    # retention can still delete the captures of reviewed slides while the review history stays.
    """
    CREATE TABLE reviews (
        id INTEGER PRIMARY KEY,
        cell_id INTEGER NOT NULL,
        capture_id INTEGER NOT NULL,
        slide_id TEXT NOT NULL,
        label TEXT NOT NULL CHECK (label IN ('blast', 'normal')),
        model_label TEXT NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('confirm', 'reclassify')),
        reviewer TEXT NOT NULL,
        created_at TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX reviews_cell ON reviews (cell_id, id);
    CREATE INDEX reviews_slide ON reviews (slide_id, id);
    """,
]
REVIEW_LABELS = ("blast", "normal")
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class CellRecord:
    box: tuple[int, int, int, int]
    probability: float
    logit: float
    label: str
    positive: bool
    needs_review: bool
    crop_png: bytes
    heatmap_jpeg: bytes


@dataclass(frozen=True)
class CaptureRecord:
    slide_id: str
    source: str
    trigger: str
    status: str
    message: str
    width: int
    height: int
    um_per_px: float | None
    model_sha256: str
    model_synthetic: bool
    field_jpeg: bytes | None
    """The archival field JPEG; None when it is written after the result (`Store.attach_field_image`)."""
    qc: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    camera: dict = field(default_factory=dict)
    cells: tuple[CellRecord, ...] = ()


@dataclass(frozen=True)
class ReconcileReport:
    orphan_dirs: tuple[str, ...]
    """Image folders with no capture row (e.g. a power cut between files and commit). Kept, not deleted."""
    missing_files: tuple[str, ...]
    """Files that rows point to but that are not on disk."""
    temp_files: tuple[str, ...]
    """Half-written temp files from an interrupted write; never counted as results."""

    @property
    def clean(self) -> bool:
        return not (self.orphan_dirs or self.missing_files or self.temp_files)

    def summary(self) -> str:
        if self.clean:
            return "store consistent"
        return (
            f"store reconcile: {len(self.orphan_dirs)} image folder(s) without a capture row, "
            f"{len(self.missing_files)} missing file(s), {len(self.temp_files)} interrupted temp file(s); "
            "nothing was deleted (see the status page)"
        )


class Store:
    """The results store under one data folder. Cheap connections, opened per call."""

    def __init__(self, data_dir: str | Path, min_free_mb: int = 200):
        self.data_dir = Path(data_dir)
        self.min_free_mb = min_free_mb
        self.images_dir = self.data_dir / IMAGES_DIR
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / DB_FILE
        self._migrate()

    # -- connections -------------------------------------------------------------------------
    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in WAL mode with foreign keys on; commits on success, rolls back on error."""
        conn = sqlite3.connect(self.db_path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _migrate(self) -> None:
        # BEGIN IMMEDIATE takes the write lock before reading the version, so two processes
        # opening a new database at once cannot both run the same migration.
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise StoreError(
                    f"{self.db_path}: database schema {version} is newer than this LeukoCam ({SCHEMA_VERSION}); "
                    "upgrade LeukoCam, or point [store] data_dir at another folder"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={step + 1}")
                log.info("store: migrated schema to version %d", step + 1)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    # -- writing -----------------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.data_dir).free / 1e6

    def check_space(self, need_bytes: int = 0) -> None:
        """Raise StoreFullError unless min_free_mb plus need_bytes are free."""
        free = self.free_mb()
        if free - need_bytes / 1e6 < self.min_free_mb:
            raise StoreFullError(
                f"disk almost full: {free:.0f} MB free, {self.min_free_mb} MB must stay free; "
                "capture refused, nothing was written. Export and delete old results, or use a larger SD card"
            )

    def save_capture(self, rec: CaptureRecord) -> int:
        """Write a capture's files, then commit its rows. Returns the capture id."""
        # A field JPEG still to come is reserved at a generous bits-per-pixel of a smear at quality 90.
        field_bytes = len(rec.field_jpeg) if rec.field_jpeg is not None else rec.width * rec.height // 3
        payload = field_bytes + sum(len(c.crop_png) + len(c.heatmap_jpeg) for c in rec.cells)
        self.check_space(payload)
        uid = uuid.uuid4().hex
        now = datetime.now(UTC)
        rel_dir = Path(now.strftime("%Y/%m/%d")) / uid
        folder = self.images_dir / rel_dir
        try:
            field_file = rel_dir / "field.jpg"
            if rec.field_jpeg is not None:
                atomic_write_bytes(self.images_dir / field_file, rec.field_jpeg)
            cell_files = []
            for i, cell in enumerate(rec.cells):
                crop_file, heat_file = rel_dir / f"cell_{i:03d}.png", rel_dir / f"cell_{i:03d}_cam.jpg"
                atomic_write_bytes(self.images_dir / crop_file, cell.crop_png)
                atomic_write_bytes(self.images_dir / heat_file, cell.heatmap_jpeg)
                cell_files.append((crop_file, heat_file))
            fsync_dir(folder.parent)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFullError(
                    "disk full while writing the capture; it was refused and its partial files removed. "
                    "Free some space (export and delete old results)"
                ) from None
            raise
        try:
            with self.connect() as conn:
                conn.execute("INSERT OR IGNORE INTO slides (id, created_at) VALUES (?, ?)",
                             (rec.slide_id, now.isoformat(timespec="milliseconds")))
                cur = conn.execute(
                    """INSERT INTO captures (uid, created_at, slide_id, source, trigger, status, message, width, height,
                       um_per_px, model_sha256, model_synthetic, qc_json, timings_json, camera_json, field_file)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        uid, now.isoformat(timespec="milliseconds"), rec.slide_id, rec.source, rec.trigger, rec.status,
                        rec.message, rec.width, rec.height, rec.um_per_px, rec.model_sha256, int(rec.model_synthetic),
                        json.dumps(rec.qc), json.dumps(rec.timings), json.dumps(rec.camera), str(field_file),
                    ),
                )
                capture_id = int(cur.lastrowid)
                conn.executemany(
                    """INSERT INTO cells (capture_id, idx, x0, y0, x1, y1, probability, logit, label, positive,
                       needs_review, crop_file, heatmap_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [
                        (capture_id, i, *map(int, c.box), float(c.probability), float(c.logit), c.label,
                         int(c.positive), int(c.needs_review), str(files[0]), str(files[1]))
                        for i, (c, files) in enumerate(zip(rec.cells, cell_files, strict=True))
                    ],
                )
        except sqlite3.Error as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if "full" in str(exc).lower():
                raise StoreFullError("disk full while committing the capture; it was refused, nothing else changed") from None
            raise
        return capture_id

    def add_timing(self, capture_id: int, stage: str, ms: float) -> None:
        """Add one stage's time to a stored capture (the store stage is only known after the commit)."""
        with self.connect() as conn:
            row = conn.execute("SELECT timings_json FROM captures WHERE id = ?", (capture_id,)).fetchone()
            if row is not None:
                timings = json.loads(row[0] or "{}")
                timings[stage] = round(ms, 2)
                conn.execute("UPDATE captures SET timings_json = ? WHERE id = ?", (json.dumps(timings), capture_id))

    # -- reading -----------------------------------------------------------------------------
    def recent_captures(self, limit: int = 20, offset: int = 0) -> list[dict]:
        """Newest captures first, each with its cell count, blast count and review count."""
        with self.connect() as conn:
            rows = conn.execute(
                """SELECT c.*, COUNT(k.id) AS n_cells,
                          COALESCE(SUM(k.positive), 0) AS n_positive,
                          COALESCE(SUM(k.needs_review), 0) AS n_review
                   FROM captures c LEFT JOIN cells k ON k.capture_id = c.id
                   GROUP BY c.id ORDER BY c.id DESC LIMIT ? OFFSET ?""",
                (limit, offset),
            ).fetchall()
        return [_capture_dict(r) for r in rows]

    def count_captures(self) -> int:
        with self.connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM captures").fetchone()[0])

    def get_capture(self, capture_id: int) -> dict | None:
        """One capture with its cells, or None."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM captures WHERE id = ?", (capture_id,)).fetchone()
            if row is None:
                return None
            cells = conn.execute("SELECT * FROM cells WHERE capture_id = ? ORDER BY idx", (capture_id,)).fetchall()
        cap = _capture_dict(row)
        cap["cells"] = [dict(c) for c in cells]
        for c in cap["cells"]:
            c["needs_review"] = bool(c["needs_review"])
            c["positive"] = bool(c["positive"])
            c["box"] = [c.pop("x0"), c.pop("y0"), c.pop("x1"), c.pop("y1")]
        cap["n_cells"] = len(cells)
        return cap

    def add_note(self, capture_id: int, note: str) -> None:
        """Append a note found after the result (the scale check's warning) to a capture's message."""
        with self.connect() as conn:
            conn.execute("UPDATE captures SET message = message || ' (' || ? || ')' WHERE id = ?", (note, capture_id))

    def attach_field_image(self, capture_id: int, jpeg: bytes) -> None:
        """Write the archival field JPEG of a capture saved without it (the result comes first).

        Raises:
            StoreFullError: the disk filled up; the capture keeps its cells, without a field image.
            StoreError: no such capture.
        """
        with self.connect() as conn:
            row = conn.execute("SELECT field_file FROM captures WHERE id = ?", (capture_id,)).fetchone()
        if row is None:
            raise StoreError(f"no capture {capture_id} to attach a field image to")
        path = self.images_dir / row["field_file"]
        try:
            atomic_write_bytes(path, jpeg)
            fsync_dir(path.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFullError(
                    f"disk full while writing the field image of capture {capture_id}: its cells are stored, the "
                    "field image is not. Free some space (export and delete old results)"
                ) from None
            raise

    def image_file(self, kind: str, item_id: int) -> Path | None:
        """Resolve a stored image by id: kind is 'field' (capture id), 'crop' or 'heatmap' (cell id)."""
        column, table = {"field": ("field_file", "captures"), "crop": ("crop_file", "cells"),
                         "heatmap": ("heatmap_file", "cells")}.get(kind, (None, None))
        if column is None:
            return None
        with self.connect() as conn:
            row = conn.execute(f"SELECT {column} FROM {table} WHERE id = ?", (item_id,)).fetchone()  # noqa: S608 (fixed names)
        if row is None:
            return None
        path = (self.images_dir / row[0]).resolve()
        return path if path.is_relative_to(self.images_dir.resolve()) else None

    # -- slides ------------------------------------------------------------------------------
    def ensure_slide(self, slide_id: str) -> None:
        """Create the slide row if it does not exist yet (a new slide from the dashboard or a long press)."""
        with self.connect() as conn:
            conn.execute("INSERT OR IGNORE INTO slides (id, created_at) VALUES (?, ?)",
                         (slide_id, datetime.now(UTC).isoformat(timespec="milliseconds")))

    def slide_summary(self, slide_id: str) -> dict | None:
        """Counts, the blast fraction with its 95% Wilson CI, and how many cells await review."""
        with self.connect() as conn:
            slide = conn.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone()
            if slide is None:
                return None
            row = conn.execute(
                """SELECT COUNT(DISTINCT c.id) AS captures,
                          COUNT(DISTINCT CASE WHEN c.status = 'ok' THEN c.id END) AS ok_captures,
                          COUNT(k.id) AS cells,
                          COALESCE(SUM(k.positive), 0) AS positive,
                          COALESCE(SUM(k.needs_review), 0) AS needs_review
                   FROM captures c LEFT JOIN cells k ON k.capture_id = c.id WHERE c.slide_id = ?""",
                (slide_id,),
            ).fetchone()
        cells, positive = int(row["cells"]), int(row["positive"])
        lo, hi = wilson_ci(positive, cells) if cells else (None, None)
        return {
            "id": slide["id"], "created_at": slide["created_at"], "reviewed_at": slide["reviewed_at"],
            "reviewed_by": slide["reviewed_by"], "captures": int(row["captures"]), "ok_captures": int(row["ok_captures"]),
            "cells": cells, "positive": positive, "needs_review": int(row["needs_review"]),
            "blast_fraction": positive / cells if cells else None, "blast_fraction_ci95": [lo, hi] if cells else None,
        }

    def list_slides(self, limit: int = 50) -> list[dict]:
        with self.connect() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM slides ORDER BY created_at DESC LIMIT ?", (limit,))]
        return [self.slide_summary(i) for i in ids]

    def mark_slide_reviewed(self, slide_id: str, by: str) -> None:
        """Record that a person reviewed the slide (which makes its captures eligible for retention)."""
        with self.connect() as conn:
            cur = conn.execute("UPDATE slides SET reviewed_at = ?, reviewed_by = ? WHERE id = ?",
                               (datetime.now(UTC).isoformat(timespec="seconds"), by, slide_id))
            if cur.rowcount == 0:
                raise KeyError(slide_id)

    # -- retention -----------------------------------------------------------------------------
    def images_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.images_dir.rglob("*") if p.is_file())

    def apply_retention(self, max_images_mb: float) -> dict:
        """Delete the oldest captures of REVIEWED slides until the images fit max_images_mb.

        Results of slides nobody has reviewed are never deleted, even when that
        leaves the store over the cap (the status page then says so). Rows go
        first, in one transaction, then the files, so a crash in between leaves
        orphan files (reported by reconcile), never rows without files.
        """
        used = self.images_bytes()
        cap = max_images_mb * 1e6
        deleted = []
        if used > cap:
            with self.connect() as conn:
                candidates = conn.execute(
                    """SELECT c.id, c.field_file FROM captures c JOIN slides s ON s.id = c.slide_id
                       WHERE s.reviewed_at IS NOT NULL ORDER BY c.id""").fetchall()
            for row in candidates:
                if used <= cap:
                    break
                folder = (self.images_dir / row["field_file"]).parent
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                with self.connect() as conn:
                    conn.execute("DELETE FROM cells WHERE capture_id = ?", (row["id"],))
                    conn.execute("DELETE FROM captures WHERE id = ?", (row["id"],))
                shutil.rmtree(folder, ignore_errors=True)
                used -= size
                deleted.append(int(row["id"]))
        if deleted:
            log.info("retention: deleted %d capture(s) of reviewed slides to stay under %.0f MB", len(deleted), max_images_mb)
        return {"deleted": deleted, "images_mb": round(used / 1e6, 1), "cap_mb": max_images_mb, "over_cap": used > cap}

    # -- reviews (append-only) -----------------------------------------------------------------
    def get_cell(self, cell_id: int) -> dict | None:
        """One cell row with its capture's slide, or None."""
        with self.connect() as conn:
            row = conn.execute("""SELECT k.*, c.slide_id FROM cells k JOIN captures c ON c.id = k.capture_id
                                  WHERE k.id = ?""", (cell_id,)).fetchone()
        return None if row is None else dict(row)

    def add_review(self, cell_id: int, label: str, reviewer: str, note: str = "") -> dict:
        """Append a person's verdict on a cell. Raises KeyError (no such cell) or ValueError (bad label/name).

        There is no method that changes or deletes a review: history only grows, and the
        current verdict of a cell is its newest review.
        """
        if label not in REVIEW_LABELS:
            raise ValueError(f"label {label!r}: use one of {', '.join(REVIEW_LABELS)}")
        reviewer = (reviewer or "").strip()
        if not reviewer or len(reviewer) > 64:
            raise ValueError("reviewer: give a name of 1-64 characters")
        cell = self.get_cell(cell_id)
        if cell is None:
            raise KeyError(cell_id)
        row = {
            "cell_id": cell_id, "capture_id": cell["capture_id"], "slide_id": cell["slide_id"], "label": label,
            "model_label": cell["label"], "action": "confirm" if label == cell["label"] else "reclassify",
            "reviewer": reviewer, "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "note": (note or "")[:500],
        }
        with self.connect() as conn:
            cur = conn.execute(f"INSERT INTO reviews ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               tuple(row.values()))
            row["id"] = int(cur.lastrowid)
        return row

    def review_history(self, *, cell_id: int | None = None, capture_id: int | None = None,
                       slide_id: str | None = None, limit: int = 1000) -> list[dict]:
        """Review rows (oldest first) of one cell, capture or slide."""
        where, arg = next((c, a) for c, a in (("cell_id", cell_id), ("capture_id", capture_id),
                                                ("slide_id", slide_id)) if a is not None)
        with self.connect() as conn:
            rows = conn.execute(f"SELECT * FROM reviews WHERE {where} = ? ORDER BY id LIMIT ?",  # noqa: S608
                                (arg, limit)).fetchall()
        return [dict(r) for r in rows]

    def current_reviews(self, capture_id: int) -> dict[int, dict]:
        """The newest review of each reviewed cell of a capture, by cell id."""
        with self.connect() as conn:
            rows = conn.execute(
                """SELECT r.* FROM reviews r JOIN (SELECT cell_id, MAX(id) AS mid FROM reviews
                   WHERE capture_id = ? GROUP BY cell_id) m ON r.id = m.mid""", (capture_id,)).fetchall()
        return {int(r["cell_id"]): dict(r) for r in rows}

    def slide_cells(self, slide_id: str | None = None, reviewed_only: bool = False) -> list[dict]:
        """Cells (of one slide, or all) with the model's result and the current verdict, oldest first."""
        sql = """SELECT k.id AS cell_id, k.capture_id, k.idx, k.x0, k.y0, k.x1, k.y1, k.probability, k.label AS model_label,
                        k.needs_review, k.crop_file, c.slide_id, c.created_at AS captured_at, c.model_sha256,
                        c.source, r.label AS reviewed_label, r.reviewer, r.created_at AS reviewed_at, r.action
                 FROM cells k JOIN captures c ON c.id = k.capture_id
                 LEFT JOIN (SELECT cell_id, MAX(id) AS mid FROM reviews GROUP BY cell_id) m ON m.cell_id = k.id
                 LEFT JOIN reviews r ON r.id = m.mid"""
        clauses, args = [], []
        if slide_id is not None:
            clauses.append("c.slide_id = ?")
            args.append(slide_id)
        if reviewed_only:
            clauses.append("r.id IS NOT NULL")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self.connect() as conn:
            rows = conn.execute(sql + " ORDER BY k.capture_id, k.idx", args).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["box"] = [d.pop("x0"), d.pop("y0"), d.pop("x1"), d.pop("y1")]
            d["needs_review"] = bool(d["needs_review"])
            d["verdict"] = d["reviewed_label"] or d["model_label"]
            out.append(d)
        return out

    def search_captures(self, *, slide_id: str | None = None, label: str | None = None,
                        needs_review: bool | None = None, date_from: str | None = None, date_to: str | None = None,
                        limit: int = 20, offset: int = 0) -> tuple[int, list[dict]]:
        """Filtered captures, newest first: (total matching, one page).

        label: captures with at least one cell whose current verdict is that label.
        needs_review: True = captures with a flagged cell nobody has reviewed yet.
        date_from / date_to: ISO dates (YYYY-MM-DD, UTC), both inclusive.
        """
        clauses, args = [], []
        if slide_id:
            clauses.append("c.slide_id = ?")
            args.append(slide_id)
        if date_from:
            clauses.append("c.created_at >= ?")
            args.append(date_from)
        if date_to:
            clauses.append("c.created_at < ?")
            args.append(date_to + "T99")  # every time of that day sorts below "T99"
        latest = "(SELECT cell_id, MAX(id) AS mid FROM reviews GROUP BY cell_id)"
        if label:
            clauses.append(f"""EXISTS (SELECT 1 FROM cells k LEFT JOIN {latest} m ON m.cell_id = k.id
                               LEFT JOIN reviews r ON r.id = m.mid
                               WHERE k.capture_id = c.id AND COALESCE(r.label, k.label) = ?)""")
            args.append(label)
        if needs_review is not None:
            pending = f"""EXISTS (SELECT 1 FROM cells k LEFT JOIN {latest} m ON m.cell_id = k.id
                          WHERE k.capture_id = c.id AND k.needs_review = 1 AND m.mid IS NULL)"""
            clauses.append(pending if needs_review else f"NOT {pending}")
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self.connect() as conn:
            total = int(conn.execute(f"SELECT COUNT(*) FROM captures c{where}", args).fetchone()[0])  # noqa: S608
            rows = conn.execute(
                f"""SELECT c.*, (SELECT COUNT(*) FROM cells k WHERE k.capture_id = c.id) AS n_cells,
                          (SELECT COALESCE(SUM(k.positive), 0) FROM cells k WHERE k.capture_id = c.id) AS n_positive,
                          (SELECT COALESCE(SUM(k.needs_review), 0) FROM cells k WHERE k.capture_id = c.id) AS n_review,
                          (SELECT COUNT(DISTINCT r.cell_id) FROM reviews r WHERE r.capture_id = c.id) AS n_reviewed
                   FROM captures c{where} ORDER BY c.id DESC LIMIT ? OFFSET ?""",  # noqa: S608
                (*args, limit, offset)).fetchall()
        return total, [_capture_dict(r) for r in rows]

    def slide_ids(self, limit: int = 500) -> list[str]:
        """Slide IDs, newest first (cheap: for pickers that need no counts)."""
        with self.connect() as conn:
            return [r[0] for r in conn.execute("SELECT id FROM slides ORDER BY created_at DESC LIMIT ?", (limit,))]

    def recent_timings(self, limit: int = 200) -> list[dict]:
        """Stage timings (ms) of the newest captures, newest first."""
        with self.connect() as conn:
            rows = conn.execute("SELECT timings_json FROM captures ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [json.loads(r[0] or "{}") for r in rows]

    def slide_provenance(self, slide_id: str) -> dict:
        """Which models and cameras made a slide's results, and its quality-check summary."""
        with self.connect() as conn:
            rows = conn.execute("SELECT model_sha256, model_synthetic, camera_json, qc_json, status FROM captures "
                                "WHERE slide_id = ?", (slide_id,)).fetchall()
        models = sorted({r["model_sha256"] for r in rows})
        cameras = sorted({json.dumps(json.loads(r["camera_json"] or "{}"), sort_keys=True) for r in rows})
        focus = [json.loads(r["qc_json"] or "{}").get("focus") for r in rows]
        focus = [f for f in focus if isinstance(f, int | float)]
        return {"model_sha256": models, "synthetic": any(r["model_synthetic"] for r in rows),
                "cameras": [json.loads(c) for c in cameras],
                "qc": {"captures": len(rows), "retake": sum(r["status"] == "retake" for r in rows),
                       "error": sum(r["status"] == "error" for r in rows),
                       "focus_min": min(focus) if focus else None, "focus_median": sorted(focus)[len(focus) // 2] if focus else None}}

    # -- start-up ----------------------------------------------------------------------------
    def reconcile(self) -> ReconcileReport:
        """Compare rows and files. Reports problems; deletes nothing."""
        with self.connect() as conn:
            rows = conn.execute("SELECT uid, field_file FROM captures").fetchall()
            cell_files = conn.execute("SELECT crop_file, heatmap_file FROM cells").fetchall()
        known_dirs = {str(Path(r["field_file"]).parent) for r in rows}
        dirs = {str(p.relative_to(self.images_dir)) for p in self.images_dir.glob("*/*/*/*") if p.is_dir()}
        orphans = tuple(sorted(dirs - known_dirs))
        referenced = [r["field_file"] for r in rows] + [f for r in cell_files for f in r]
        missing = tuple(f for f in referenced if not (self.images_dir / f).is_file())
        temps = tuple(sorted(str(p.relative_to(self.images_dir)) for p in self.images_dir.rglob("*.tmp")))
        report = ReconcileReport(orphans, missing, temps)
        if not report.clean:
            log.warning(report.summary())
        return report


def _capture_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    for key in ("qc", "timings", "camera"):
        d[key] = json.loads(d.pop(f"{key}_json") or "{}")
    d["model_synthetic"] = bool(d["model_synthetic"])
    return d


