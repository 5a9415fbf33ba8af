"""systemd's service notification protocol (sd_notify) without libsystemd.

`firmware_config/leukocam.service` is `Type=notify` with `WatchdogSec=`: the
service says READY=1 once the dashboard listens, WATCHDOG=1 while it is
healthy, and STOPPING=1 when it shuts down. The protocol is one datagram per
message to the AF_UNIX socket named in $NOTIFY_SOCKET (a path, or an abstract
socket written with a leading '@'). Without $NOTIFY_SOCKET (`make run`, tests,
a terminal) every call is a no-op, so the serve code needs no special case.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one notification such as "READY=1" to systemd.

    Returns:
        True when it was sent; False when not run by systemd ($NOTIFY_SOCKET unset) or the
        send failed (logged, never raised: a notification must not take the service down).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """READY=1: start-up is complete (for Type=notify, `systemctl start` returns now)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """STOPPING=1: the service is shutting down on purpose."""
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    """WATCHDOG=1: the service is alive; systemd restarts it if these stop for WatchdogSec."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec), or None when no watchdog is asked for.

    Reads $WATCHDOG_USEC, and $WATCHDOG_PID when set (the watchdog is for that process only).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


def http_answers(host: str, port: int, path: str = "/api/health", timeout: float = 5.0) -> bool:
    """True when an HTTP server at host:port answers path with any status (503 counts as alive).

    A wildcard listen address (0.0.0.0, ::) is asked on the loopback address.
    """
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Watchdog:
    """A daemon thread that sends WATCHDOG=1 every `interval` seconds while `healthy()` is True.

    When `healthy()` returns False (or raises), that ping is skipped; after WatchdogSec without
    one, systemd kills the service and Restart=on-failure starts it again. A no-op object when
    systemd asked for no watchdog. Use as a context manager, or call start() and stop().

    Args:
        healthy: the liveness check, e.g. the capture worker thread is alive and the dashboard
            answers (`http_answers`). It runs on the watchdog thread and must be quick.
        interval: seconds between pings; None = half of $WATCHDOG_USEC.
    """

    def __init__(self, healthy: Callable[[], bool], interval: float | None = None):
        self.healthy = healthy
        self.interval = interval if interval is not None else watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.interval is None or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                ok = bool(self.healthy())
            except Exception:  # a broken check means unhealthy, never a dead watchdog thread
                log.exception("watchdog health check failed")
                ok = False
            if ok:
                watchdog_ping()
            else:
                log.warning("watchdog: unhealthy, not pinging (systemd restarts the service after WatchdogSec)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
