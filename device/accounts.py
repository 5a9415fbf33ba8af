"""Dashboard accounts: hashed passwords in `auth.json` under the store's data folder.

`leukocam set-password USER` writes it (atomically, mode 0600). Passwords are
stored as werkzeug scrypt hashes, never in clear. Login is required whenever the
dashboard listens beyond this machine (see `login_required_for`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

from device.errors import LeukoCamError
from device.imaging import atomic_write_bytes

AUTH_FILE = "auth.json"
USERNAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
MIN_PASSWORD = 8


class AuthError(LeukoCamError):
    """An account cannot be created or read as asked."""


def login_required_for(host: str, login: str = "auto") -> bool:
    """True unless the server listens on the loopback interface only (and `[web] login` is not "always")."""
    return login == "always" or host.strip().lower() not in LOCAL_HOSTS


def auth_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / AUTH_FILE


def load_users(data_dir: str | Path) -> dict[str, str]:
    """{username: password hash}; empty when no password has been set."""
    path = auth_path(data_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        users = data["users"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuthError(f"{path}: unreadable account file ({exc}); run `leukocam set-password` again") from None
    return {str(k): str(v) for k, v in users.items()}


def set_password(data_dir: str | Path, username: str, password: str) -> Path:
    """Create or change one account. Returns the account file's path."""
    if not USERNAME.fullmatch(username or ""):
        raise AuthError(f"user name {username!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    if len(password or "") < MIN_PASSWORD:
        raise AuthError(f"password too short: use at least {MIN_PASSWORD} characters")
    users = load_users(data_dir)
    users[username] = generate_password_hash(password, method="scrypt")
    path = auth_path(data_dir)
    atomic_write_bytes(path, json.dumps({"version": 1, "users": users}, indent=1).encode())
    os.chmod(path, 0o600)
    return path


@functools.cache
def decoy_hash() -> str:
    """A hash made once, so that checking a password for an unknown user costs one scrypt, like a known one."""
    return generate_password_hash(secrets.token_hex(16), method="scrypt")


def verify(data_dir: str | Path, username: str, password: str) -> bool:
    """True when the user exists and the password matches.

    Exactly one scrypt check runs either way (an unknown user is checked against a decoy hash), so the
    time a login takes does not tell whether the user name exists.
    """
    users = load_users(data_dir)
    stored = users.get(username or "")
    ok = check_password_hash(stored if stored is not None else decoy_hash(), password or "")
    return ok and stored is not None
