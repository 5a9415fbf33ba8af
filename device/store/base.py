"""The store's folder, its SQLite connections and its disk-space rule.

Connections are cheap and opened per call: `connect()` (read-write) for changes, `read()`
(opened read-only by SQLite, so it cannot write anything) for queries. WAL mode is set once,
when the database is created (it is stored in the file), never per connection.

A full disk must not stop reads. A WAL database keeps its index in `<db>-shm` (32 KB); when the
last connection to it closes, SQLite checkpoints and deletes `-wal` and `-shm`, and the next
connection has to create them again, which a full disk refuses (reads failed with "disk I/O
error"). So each Store holds one read-only *anchor* connection for its life: while it is open the
per-call connections are never the last, and as it is read-only it never checkpoints nor deletes
the files itself when it closes, so they are still there for the next process too.

Every write that meets a full disk (SQLITE_FULL, or ENOSPC from an image file) raises
StoreFullError saying what to do; nothing is half stored.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from device.errors import LeukoCamError, StoreError, StoreFullError
from device.store.files import disk_full_error, folder_bytes, is_disk_full
from device.store.schema import migrate

log = logging.getLogger(__name__)

DB_FILE = "leukocam.sqlite3"
IMAGES_DIR = "images"
LOW_SPACE_BYTES = 1_000_000
"""Below this much free space an SQLite I/O error (growing -shm, fsync) is taken to be the full disk."""


def _user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def is_full_error(exc: BaseException, folder: Path) -> bool:
    """Is exc the disk (or a quota) being full? SQLITE_FULL, ENOSPC / EDQUOT, or an SQLite I/O error on a full disk."""
    if isinstance(exc, OSError):
        return is_disk_full(exc)
    if not isinstance(exc, sqlite3.Error):
        return False
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
        return True
    if code == sqlite3.SQLITE_IOERR:  # e.g. SQLITE_IOERR_SHMSIZE: ENOSPC while growing the WAL index
        try:
            return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
        except OSError:
            return False
    return False


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.rollback()
    except sqlite3.Error:
        pass


def check_data_dir(data_dir: Path) -> None:
    """Create data_dir if needed; raise StoreError, naming store.data_dir and what to do, if it cannot be used."""
    where = f"store.data_dir {data_dir}"
    if data_dir.exists() and not data_dir.is_dir():
        raise StoreError(f"{where} is a file: point store.data_dir at a folder")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((p for p in data_dir.parents if p.exists() and not p.is_dir()), data_dir)
        raise StoreError(
            f"{where} cannot be created: {parent} is a file (or a broken link); point store.data_dir at a folder"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _not_writable(where, Path(exc.filename or data_dir)) from None
        raise StoreError(f"{where} cannot be created ({exc.strerror}): choose another folder") from None
    _check_writable(where, data_dir)
    for name in (IMAGES_DIR, DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"):
        path = data_dir / name
        if name == IMAGES_DIR and path.exists() and not path.is_dir():
            raise StoreError(f"{where}: {path} is a file, not the images folder: move it away")
        if name == DB_FILE and path.is_dir():
            raise StoreError(f"{where}: {path} is a folder, not the database: move it away")
        if path.exists():
            _check_writable(where, path)


def _check_writable(where: str, path: Path) -> None:
    if not os.access(path, os.R_OK | os.W_OK | (os.X_OK if path.is_dir() else 0), effective_ids=True):
        raise _not_writable(where, path)


def _not_writable(where: str, path: Path) -> StoreError:
    try:
        read_only = bool(os.statvfs(path if path.exists() else path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return StoreError(
            f"{where}: {path} is not writable by user {_user()} (a read-only file system): "
            "remount it read-write, or choose another folder"
        )
    return StoreError(
        f"{where}: {path} is not writable by user {_user()}: chown/chmod it (e.g. chown -R {_user()} {path}), "
        "or choose another folder"
    )


class StoreBase:
    """One data folder: leukocam.sqlite3 (WAL) for rows, images/ for files. Cheap connections, opened per call."""

    def __init__(self, data_dir: str | Path, min_free_mb: int = 200):
        self.data_dir = Path(data_dir)
        self.min_free_mb = min_free_mb
        self.images_dir = self.data_dir / IMAGES_DIR
        self.db_path = self.data_dir / DB_FILE
        self._anchor: sqlite3.Connection | None = None
        check_data_dir(self.data_dir)
        self._ro_uri = self.db_path.resolve().as_uri() + "?mode=ro"
        try:
            if self.db_path.exists():  # anchor first, so that the migration's connection is not the last one
                self._open_anchor()
            migrate(self.db_path)
            self._open_anchor()
        except sqlite3.Error as exc:
            self.close()
            raise self._open_error(exc) from None
        except BaseException:
            self.close()
            raise
        try:
            self.images_dir.mkdir(exist_ok=True)
        except OSError as exc:
            self.close()
            raise StoreError(
                f"store.data_dir {self.data_dir}: cannot create {self.images_dir} ({exc.strerror})"
            ) from None
        try:
            self._count_uncounted_bytes()
        except StoreFullError as exc:
            log.warning("store: older captures' sizes not counted yet (%s); counted at a later start", exc)

    def close(self) -> None:
        """Close the anchor connection (before unmounting the data folder, say); calls after it still work."""
        if self._anchor is not None:
            self._anchor.close()
            self._anchor = None

    def _open_anchor(self) -> None:
        if self._anchor is None:
            self._anchor = sqlite3.connect(
                self._ro_uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False
            )
        # A finished read (all rows fetched) attaches the connection to the WAL and ends its transaction,
        # so it holds no snapshot that would keep checkpoints from completing.
        self._anchor.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()

    def _open_error(self, exc: sqlite3.Error) -> LeukoCamError | sqlite3.Error:
        """A StoreError (or StoreFullError) saying what is wrong with the database file and what to do."""
        if is_full_error(exc, self.data_dir):
            return disk_full_error(self.data_dir, "opening the database")
        where = f"store.data_dir {self.data_dir}"
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            return StoreError(
                f"{where}: {self.db_path} is not a usable LeukoCam database (SQLite says: {exc}); nothing was "
                "changed or moved. Restore it from a backup, move it away to start an empty store, or point "
                "store.data_dir at another folder"
            )
        if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
            return StoreError(
                f"{where}: cannot open {self.db_path} for writing as user {_user()} (SQLite says: {exc}): "
                "chown/chmod the folder and its files, or choose another folder"
            )
        return exc

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A read-write connection with foreign keys on; commits on success, rolls back on error.

        A full disk raises StoreFullError (and the transaction is rolled back: nothing was stored).
        """
        conn = sqlite3.connect(self.db_path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
            conn.commit()
        except BaseException as exc:
            _rollback_quietly(conn)
            if isinstance(exc, sqlite3.Error) and is_full_error(exc, self.data_dir):
                raise disk_full_error(self.data_dir, "writing to the database") from exc
            raise
        finally:
            conn.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection for queries: SQLite opens the file read-only, so nothing on this path writes."""
        conn = sqlite3.connect(self._ro_uri, uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        except sqlite3.Error as exc:
            if is_full_error(exc, self.data_dir):
                raise disk_full_error(self.data_dir, "reading the database") from exc
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
        with self.read() as conn:
            rows = conn.execute("SELECT id, field_file FROM captures WHERE bytes IS NULL").fetchall()
        if not rows:
            return
        with self.connect() as conn:
            for row in rows:
                size = folder_bytes((self.images_dir / row["field_file"]).parent)
                conn.execute("UPDATE captures SET bytes = ? WHERE id = ? AND bytes IS NULL", (size, row["id"]))
        log.info("store: counted the image bytes of %d older capture(s)", len(rows))
