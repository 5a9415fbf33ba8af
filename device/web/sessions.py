"""Server-side login sessions and the persistent cookie-signing key.

The browser's cookie (signed with `session_key`, a 0600 file beside auth.json) holds only
a random session token. What the token means lives here, in `sessions.sqlite3` (0600):
logout deletes the row, so a cookie copied before logout is worthless afterwards; a login
always makes a new token (no fixation); and a session ends after `IDLE_S` without a
request or `MAX_AGE_S` after the login, whichever comes first. Tokens are stored as their
SHA-256, so a copy of the file does not log anyone in. Restarting the appliance keeps
everyone logged in, because both the key and the rows are on disk.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from device.errors import StoreError, StoreFullError

KEY_FILE = "session_key"
DB_FILE = "sessions.sqlite3"
MAX_AGE_S = 12 * 3600
"""A login lasts at most one long shift."""
IDLE_S = 2 * 3600
"""...and ends earlier after this long without a request."""
TOUCH_EVERY_S = 60
"""`last_seen` is written at most this often per session (a request does not mean a disk write)."""


def persistent_key(data_dir: str | Path) -> str:
    """The cookie-signing key: read from `session_key`, or made once (0600, atomically) when absent."""
    path = Path(data_dir) / KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise StoreError(
            f"{path}: cannot read the session key ({exc.strerror}); check the folder's permissions"
        ) from None
    if len(key) >= 32:
        return key
    key = secrets.token_hex(32)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(
            f"{path}: cannot write the session key ({exc.strerror}); make the data folder writable"
        ) from None
    return key


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionRegistry:
    """Which session tokens are logged in, as whom, since when."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / DB_FILE
        with closing(self._connect()) as conn, conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS sessions (token_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, "
                "created REAL NOT NULL, last_seen REAL NOT NULL)"
            )
        os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def create(self, user: str) -> str:
        """A new session for `user`; returns the token for the cookie. Old expired rows are dropped."""
        token, now = secrets.token_urlsafe(32), time.time()
        try:
            with closing(self._connect()) as conn, conn:
                conn.execute("DELETE FROM sessions WHERE created < ? OR last_seen < ?", (now - MAX_AGE_S, now - IDLE_S))
                conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (_digest(token), user, now, now))
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise StoreFullError("disk full: cannot record the login; free some space and log in again") from None
            raise
        return token

    def user_of(self, token: str | None) -> str | None:
        """The user a token is logged in as, or None (unknown, logged out or expired)."""
        if not token or not isinstance(token, str):
            return None
        now = time.time()
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT user, created, last_seen FROM sessions WHERE token_sha256 = ?", (_digest(token),)
            ).fetchone()
            if row is None:
                return None
            user, created, last_seen = row
            if created < now - MAX_AGE_S or last_seen < now - IDLE_S:
                return None
            if now - last_seen > TOUCH_EVERY_S:
                try:
                    with conn:
                        conn.execute("UPDATE sessions SET last_seen = ? WHERE token_sha256 = ?", (now, _digest(token)))
                except sqlite3.OperationalError:  # a full disk or a busy file: the session still counts
                    pass
        return user

    def end(self, token: str | None) -> None:
        """Log out: the token stops working everywhere at once."""
        if not token or not isinstance(token, str):
            return
        with closing(self._connect()) as conn, conn:
            conn.execute("DELETE FROM sessions WHERE token_sha256 = ?", (_digest(token),))

    def end_user(self, user: str) -> int:
        """End every session of one user (after a password change); returns how many."""
        with closing(self._connect()) as conn, conn:
            return conn.execute("DELETE FROM sessions WHERE user = ?", (user,)).rowcount
