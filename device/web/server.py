"""The WSGI server the dashboard runs on: waitress, with limits that keep slow clients from starving the rest.

waitress reads each request completely in its event loop before a worker thread sees it, so a client
that sends half a request holds a connection, not a thread. What bounds those connections:
`client_timeout_s` closes any connection idle that long (waitress checks every `CLEANUP_S`), and
`max_connections` caps how many are open; beyond it new clients wait in the kernel's listen queue.
poll() instead of select(), because select() cannot watch more than 1024 descriptors.
"""

from __future__ import annotations

from waitress import create_server

from device.config import WebConfig

CLEANUP_S = 2
"""How often waitress looks for timed-out connections."""
BODY_SLACK = 1024 * 1024
"""Multipart framing on top of the largest accepted upload."""


def make_server(app, web: WebConfig, *, host: str | None = None, port: int | None = None):
    """A bound, listening waitress server for `app` (call `.run()`; `.close()` stops it)."""
    return create_server(
        app,
        host=web.host if host is None else host,
        port=web.port if port is None else port,
        threads=web.threads,
        connection_limit=web.max_connections,
        channel_timeout=web.client_timeout_s,
        cleanup_interval=CLEANUP_S,
        max_request_body_size=web.max_upload_mb * 1024 * 1024 + BODY_SLACK,
        max_request_header_size=64 * 1024,
        asyncore_use_poll=True,
    )
