"""Dashboard load benchmark: gallery and status latency over a big store, alone and under load.

`bench_dashboard()` fills a temporary store with many captures (rows by direct SQL,
sharing one capture's image files), serves the real app with waitress on
127.0.0.1 (an ephemeral port; nothing else is contacted), and measures median and
p95 latency of the gallery and status pages (a) with one client and (b) with many
client threads while the appliance keeps capturing on the replay camera.
Request counts and time are bounded.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import tempfile
import threading
import time
from pathlib import Path

from device.config import Config, ServiceConfig, StoreConfig
from device.errors import BusyError
from device.web.common import latency_summary

PAGES = ("/captures", "/status")


def _fill(store, n_captures: int, n_slides: int = 50) -> None:
    """Copy capture 1 (and its cells) n_captures - 1 times, spread over n_slides slides."""
    with store.connect() as conn:
        cap = dict(conn.execute("SELECT * FROM captures WHERE id = 1").fetchone())
        cells = [dict(r) for r in conn.execute("SELECT * FROM cells WHERE capture_id = 1")]
        slides = [f"bench-{i:03d}" for i in range(n_slides)]
        conn.executemany(
            "INSERT OR IGNORE INTO slides (id, created_at) VALUES (?, ?)", [(s, cap["created_at"]) for s in slides]
        )
        cap_cols = [c for c in cap if c != "id"]
        cell_cols = [c for c in cells[0] if c not in ("id", "capture_id")] if cells else []
        for i in range(2, n_captures + 1):
            row = {**cap, "uid": f"bench{i:08d}", "slide_id": slides[i % n_slides]}
            cid = conn.execute(
                f"INSERT INTO captures ({', '.join(cap_cols)}) VALUES ({', '.join('?' * len(cap_cols))})",
                [row[c] for c in cap_cols],
            ).lastrowid
            if cells:
                conn.executemany(
                    f"INSERT INTO cells (capture_id, {', '.join(cell_cols)}) VALUES (?, {', '.join('?' * len(cell_cols))})",
                    [(cid, *[c[k] for k in cell_cols]) for c in cells],
                )


def _client(base_port: int, paths, deadline: float, max_requests: int, out: dict, errors: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", base_port, timeout=30)
    try:
        for i in range(max_requests):
            if time.monotonic() > deadline:
                break
            path = paths[i % len(paths)]
            t = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{path}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", base_port, timeout=30)
                continue
            if ok:
                out.setdefault(path, []).append((time.perf_counter() - t) * 1000)
            else:
                errors.append(f"{path}: HTTP {resp.status}")
    finally:
        conn.close()


def bench_dashboard(
    n_captures: int = 10_000,
    clients: int = 20,
    seconds: float = 20.0,
    requests_alone: int = 50,
    max_requests_per_client: int = 200,
    data_dir: str | Path | None = None,
) -> dict:
    """Measure the dashboard under a big store. Returns a dict with a 'markdown' table."""
    from device.service import Appliance
    from device.web import create_app
    from device.web.server import make_server

    with tempfile.TemporaryDirectory(prefix="leukocam-bench-") as tmp:
        cfg = Config()
        cfg = dataclasses.replace(
            cfg,
            store=dataclasses.replace(StoreConfig(), data_dir=str(data_dir or Path(tmp) / "store"), min_free_mb=1),
            service=ServiceConfig(startup_captures=0),
            model=dataclasses.replace(cfg.model, threads=1),
            web=dataclasses.replace(cfg.web, host="127.0.0.1", port=0),
        )
        with Appliance(cfg) as appliance:
            t0 = time.perf_counter()
            if appliance.capture_now("bench").capture_id is None:
                raise RuntimeError("the first benchmark capture failed: " + str(appliance.last_error))
            _fill(appliance.store, n_captures)
            fill_s = time.perf_counter() - t0
            app = create_app(appliance, login_required=False)
            server = make_server(app, cfg.web, host="127.0.0.1", port=0)
            port = server.effective_port
            # 20 clients on a few threads queue by design; waitress would log every queued task.
            logging.getLogger("waitress.queue").setLevel(logging.ERROR)
            closing = threading.Event()

            def serve():
                try:
                    server.run()
                except OSError:  # select() on the listening socket that close() just shut (EBADF)
                    if not closing.is_set():
                        raise

            thread = threading.Thread(target=serve, name="bench-waitress", daemon=True)
            thread.start()
            errors: list[str] = []
            try:
                alone: dict[str, list[float]] = {}
                _client(port, PAGES, time.monotonic() + seconds, requests_alone * len(PAGES), alone, errors)

                appliance.start()
                stop = threading.Event()
                before = appliance.captures_done

                def capture_loop():
                    while not stop.is_set():
                        try:
                            appliance.request_capture("bench")
                        except BusyError:
                            pass
                        stop.wait(0.05)

                loop = threading.Thread(target=capture_loop, name="bench-captures", daemon=True)
                loop.start()
                loaded: dict[str, list[float]] = {}
                per_thread = [dict() for _ in range(clients)]
                deadline = time.monotonic() + seconds
                workers = [
                    threading.Thread(
                        target=_client, args=(port, PAGES, deadline, max_requests_per_client, per_thread[i], errors)
                    )
                    for i in range(clients)
                ]
                started = time.perf_counter()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join(seconds + 60)
                wall = time.perf_counter() - started
                stop.set()
                loop.join(10)
                for d in per_thread:
                    for p, v in d.items():
                        loaded.setdefault(p, []).extend(v)
                captured = appliance.captures_done - before
            finally:
                closing.set()
                server.close()
                thread.join(10)
    result = {
        "n_captures": n_captures,
        "clients": clients,
        "fill_s": round(fill_s, 2),
        "alone": latency_summary(alone),
        "loaded": latency_summary(loaded),
        "loaded_wall_s": round(wall, 1),
        "loaded_requests": sum(len(v) for v in loaded.values()),
        "captures_during_load": captured,
        "errors": errors[:20],
        "n_errors": len(errors),
    }
    lines = [
        "| page | alone median ms | alone p95 ms | loaded median ms | loaded p95 ms | loaded n |",
        "|---|---|---|---|---|---|",
    ]
    for p in PAGES:
        a, b = result["alone"].get(p, {}), result["loaded"].get(p, {})
        lines.append(
            f"| {p} | {a.get('median_ms', '-')} | {a.get('p95_ms', '-')} | {b.get('median_ms', '-')} | "
            f"{b.get('p95_ms', '-')} | {b.get('n', 0)} |"
        )
    lines.append(
        f"\n{n_captures} captures in the store; {clients} client threads for {result['loaded_wall_s']} s "
        f"while {captured} capture(s) ran; {len(errors)} error(s)."
    )
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":  # python -m device.web.load_bench
    print(bench_dashboard()["markdown"])
