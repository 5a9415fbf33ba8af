"""The store's folder, its SQLite connections and its disk-space rule."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from device.errors import StoreFullError
from device.store.files import folder_bytes
from device.store.schema import migrate

log = logging.getLogger(__name__)

DB_FILE = "leukocam.sqlite3"
IMAGES_DIR = "images"


class StoreBase:
    """One data folder: leukocam.sqlite3 (WAL) for rows, images/ for files. Cheap connections, opened per call."""

    def __init__(self, data_dir: str | Path, min_free_mb: int = 200):
        self.data_dir = Path(data_dir)
        self.min_free_mb = min_free_mb
        self.images_dir = self.data_dir / IMAGES_DIR
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / DB_FILE
        migrate(self.db_path)
        self._count_uncounted_bytes()

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

    def _count_uncounted_bytes(self) -> None:
        """Captures stored before sizes were recorded get theirs from the files, once."""
        with self.connect() as conn:
            rows = conn.execute("SELECT id, field_file FROM captures WHERE bytes IS NULL").fetchall()
            for row in rows:
                size = folder_bytes((self.images_dir / row["field_file"]).parent)
                conn.execute("UPDATE captures SET bytes = ? WHERE id = ?", (size, row["id"]))
        if rows:
            log.info("store: counted the image bytes of %d older capture(s)", len(rows))
