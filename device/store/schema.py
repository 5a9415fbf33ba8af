"""The SQLite schema, as numbered migration steps, and the code that applies them."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from device.errors import StoreError

log = logging.getLogger(__name__)

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
    # Bytes on disk per capture, so retention sums a column instead of walking every image.
    # NULL = not counted yet (captures stored before this step): filled in at start-up.
    """
    ALTER TABLE captures ADD COLUMN bytes INTEGER;
    """,
    # Duplicate cells (the same cell captured again in one slide: a field recaptured, overlapping fields):
    # dhash is the crop's 64-bit difference hash (16 hex digits, device.store.duplicates), duplicate_of the
    # earlier cell of the same slide it repeats. NULL dhash = not checked (cells stored before this step, or a
    # crop too flat to hash); duplicates count once in a slide. No foreign key: duplicate_of may name a cell
    # that retention deleted later (its reviews stay). cam_scale: the fixed |CAM| that the capture's heatmaps
    # were drawn against (device.heatmap); NULL = drawn before, each scaled to its own peak.
    """
    ALTER TABLE cells ADD COLUMN dhash TEXT;
    ALTER TABLE cells ADD COLUMN duplicate_of INTEGER;
    CREATE INDEX cells_duplicate ON cells (duplicate_of);
    ALTER TABLE captures ADD COLUMN cam_scale REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db_path: Path) -> None:
    """Bring the database at db_path to SCHEMA_VERSION (creating it, in WAL mode), or raise StoreError if it is newer.

    Writes nothing when the database is already current: a full disk must not stop the store from opening.
    """
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        _refuse_newer(db_path, conn.execute("PRAGMA user_version").fetchone()[0])
        # WAL is set once, here: the journal mode is stored in the database file, so connections need not set it.
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        # BEGIN IMMEDIATE takes the write lock before reading the version again, so two processes
        # opening a new database at once cannot both run the same migration.
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _refuse_newer(db_path, version)
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


def _refuse_newer(db_path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{db_path}: database schema {version} is newer than this LeukoCam ({SCHEMA_VERSION}); "
            "upgrade LeukoCam, or point [store] data_dir at another folder"
        )
