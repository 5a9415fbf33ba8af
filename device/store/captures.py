"""Captures: saving one (files first, then its rows in one transaction) and reading them back."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from device.errors import NotFoundError, StoreError, StoreFullError
from device.imaging import atomic_write_files
from device.store.duplicates import from_hex, group_latest_review, group_reviewed, match_repeats, to_hex
from device.store.files import FULL_ADVICE, disk_full_error, is_disk_full, remove_folder, write_capture_files
from device.store.records import CaptureRecord

CELL_COUNTS = f"""
    (SELECT COUNT(*) FROM cells k WHERE k.capture_id = c.id) AS n_cells,
    (SELECT COALESCE(SUM(k.positive), 0) FROM cells k WHERE k.capture_id = c.id) AS n_positive,
    (SELECT COUNT(*) FROM cells k WHERE k.capture_id = c.id AND k.needs_review = 1) AS n_flagged,
    (SELECT COUNT(*) FROM cells k WHERE k.capture_id = c.id AND k.needs_review = 1
        AND NOT {group_reviewed("k")}) AS n_review,
    (SELECT COUNT(*) FROM cells k WHERE k.capture_id = c.id AND {group_reviewed("k")}) AS n_reviewed,
    (SELECT COUNT(*) FROM cells k WHERE k.capture_id = c.id AND k.duplicate_of IS NOT NULL) AS n_duplicates"""
"""Per-capture cell counts. n_review: flagged cells nobody has reviewed yet (what `review=pending` finds);
n_flagged: all the model flagged; n_reviewed: cells reviewed (this copy or another copy of the same cell)."""


class CaptureQueries:
    """Store methods for captures and their cells (mixed into device.store.Store)."""

    def save_capture(self, rec: CaptureRecord) -> int:
        """Write a capture's files, then commit its rows (with its "store" time) in one transaction.

        A cell that repeats an earlier cell of the same slide (device.store.duplicates) is stored with
        `duplicate_of` set, and counts once in the slide.

        Returns the capture id. Raises StoreFullError, before anything is written, when the
        capture would leave less than min_free_mb free, and also when the disk fills up while
        writing (then nothing of the capture is kept).
        """
        t0 = time.perf_counter()
        # A field JPEG still to come is reserved at a generous bits-per-pixel of a smear at quality 90.
        field_bytes = len(rec.field_jpeg) if rec.field_jpeg is not None else rec.width * rec.height // 3
        # So are crop PNGs still to come, at their raw size.
        crop_bytes = sum(len(c.crop_png) if c.crop_png is not None else c.crop_nbytes for c in rec.cells)
        self.check_space(field_bytes + crop_bytes + sum(len(c.heatmap_jpeg) for c in rec.cells))
        uid = uuid.uuid4().hex
        now = datetime.now(UTC)
        rel_dir = Path(now.strftime("%Y/%m/%d")) / uid
        files = write_capture_files(self.images_dir, rel_dir, rec.field_jpeg, rec.cells)
        try:
            with self.connect() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO slides (id, created_at) VALUES (?, ?)",
                    (rec.slide_id, now.isoformat(timespec="milliseconds")),
                )
                cur = conn.execute(
                    """INSERT INTO captures (uid, created_at, slide_id, source, trigger, status, message, width, height,
                       um_per_px, model_sha256, model_synthetic, qc_json, timings_json, camera_json, field_file, bytes,
                       cam_scale)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        uid,
                        now.isoformat(timespec="milliseconds"),
                        rec.slide_id,
                        rec.source,
                        rec.trigger,
                        rec.status,
                        rec.message,
                        rec.width,
                        rec.height,
                        rec.um_per_px,
                        rec.model_sha256,
                        int(rec.model_synthetic),
                        json.dumps(rec.qc),
                        "{}",
                        json.dumps(rec.camera),
                        str(files.field_file),
                        files.bytes,
                        rec.cam_scale,
                    ),
                )
                capture_id = int(cur.lastrowid)
                # This transaction holds the write lock (the INSERTs above): no other capture of the slide
                # can come in between the look at the earlier cells and the commit.
                repeats = self._repeats(conn, rec, capture_id)
                conn.executemany(
                    """INSERT INTO cells (capture_id, idx, x0, y0, x1, y1, probability, logit, label, positive,
                       needs_review, crop_file, heatmap_file, dhash, duplicate_of)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [
                        (
                            capture_id,
                            i,
                            *map(int, c.box),
                            float(c.probability),
                            float(c.logit),
                            c.label,
                            int(c.positive),
                            int(c.needs_review),
                            str(crop),
                            str(heat),
                            to_hex(c.dhash),
                            dup,
                        )
                        for i, (c, (crop, heat), dup) in enumerate(
                            zip(rec.cells, files.cell_files, repeats, strict=True)
                        )
                    ],
                )
                # The store stage's own time goes in with the rows (all but the commit's fsync).
                timings = dict(rec.timings, store=round((time.perf_counter() - t0) * 1000, 2))
                conn.execute("UPDATE captures SET timings_json = ? WHERE id = ?", (json.dumps(timings), capture_id))
                # This transaction holds the write lock now, as reconcile does while it moves leftovers into
                # quarantine: if another process's start-up took our not-yet-committed files, do not commit.
                if not (self.images_dir / rel_dir).is_dir():
                    raise StoreError(
                        "capture refused: its image files were moved into quarantine (by a LeukoCam starting up "
                        "at the same time) before it was stored; capture again"
                    )
        except (sqlite3.Error, StoreError, StoreFullError) as exc:
            remove_folder(self.images_dir / rel_dir)
            if isinstance(exc, StoreFullError):
                raise disk_full_error(
                    self.data_dir, "committing the capture", "its files removed, " + FULL_ADVICE
                ) from None
            raise
        return capture_id

    @staticmethod
    def _repeats(conn: sqlite3.Connection, rec: CaptureRecord, capture_id: int) -> list[int | None]:
        """Per cell of rec: the earlier first cell of the same slide that it repeats, or None."""
        if not any(c.dhash is not None for c in rec.cells):
            return [None] * len(rec.cells)
        rows = conn.execute(
            """SELECT k.id, k.dhash, k.x0, k.y0, k.x1, k.y1 FROM cells k JOIN captures c ON c.id = k.capture_id
               WHERE c.slide_id = ? AND c.id != ? AND k.dhash IS NOT NULL AND k.duplicate_of IS NULL""",
            (rec.slide_id, capture_id),
        ).fetchall()
        earlier = [(int(r["id"]), from_hex(r["dhash"]), (r["x0"], r["y0"], r["x1"], r["y1"])) for r in rows]
        return match_repeats([(c.dhash, tuple(c.box)) for c in rec.cells], earlier)

    def add_timing(self, capture_id: int, stage: str, ms: float) -> None:
        """Add the time of a stage that runs after the result is stored (archive, scale check)."""
        with self.connect() as conn:
            row = conn.execute("SELECT timings_json FROM captures WHERE id = ?", (capture_id,)).fetchone()
            if row is not None:
                timings = json.loads(row[0] or "{}")
                timings[stage] = round(ms, 2)
                conn.execute("UPDATE captures SET timings_json = ? WHERE id = ?", (json.dumps(timings), capture_id))

    def attach_field_image(self, capture_id: int, jpeg: bytes) -> None:
        """Write the archival field JPEG of a capture saved without it (the result comes first).

        Raises:
            StoreFullError: the disk filled up; the capture keeps its cells, without a field image.
            NotFoundError: no such capture.
        """
        with self.read() as conn:
            row = conn.execute("SELECT field_file FROM captures WHERE id = ?", (capture_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no capture {capture_id} to attach a field image to")
        self._attach_files(
            capture_id, {row["field_file"]: jpeg}, "field image", "its cells are stored, the field image is not"
        )

    def attach_cell_crops(self, capture_id: int, pngs: list[bytes]) -> None:
        """Write the crop PNGs of a capture saved without them (the result comes first), one per cell in order.

        Raises:
            StoreFullError: the disk filled up; the capture keeps its results and heatmaps, without the crops.
            NotFoundError: no such capture (deleted meanwhile, as by retention).
            StoreError: the capture has not that many cells.
        """
        with self.read() as conn:
            rows = conn.execute(
                "SELECT crop_file FROM cells WHERE capture_id = ? ORDER BY idx", (capture_id,)
            ).fetchall()
        if not rows and pngs and self.get_capture(capture_id) is None:
            raise NotFoundError(f"no capture {capture_id} to attach cell crops to")
        if len(rows) != len(pngs):
            raise StoreError(f"capture {capture_id} has {len(rows)} cell(s), not the {len(pngs)} crops to attach")
        if not pngs:
            return
        files = {r["crop_file"]: png for r, png in zip(rows, pngs, strict=True)}
        self._attach_files(capture_id, files, "cell crops", "its results and heatmaps are stored, the crops are not")

    def _attach_files(self, capture_id: int, files: dict[str, bytes], what: str, kept: str) -> None:
        """Write images into a stored capture's folder (paths relative to images/), durably; count their bytes.

        A capture deleted meanwhile (retention runs right after a result is stored) gets no new folder: its
        folder is gone, or it goes again when the row turns out to be gone (NotFoundError either way).
        """
        folder = (self.images_dir / next(iter(files))).parent
        gone = NotFoundError(f"capture {capture_id} was deleted before its {what} could be written")
        if not folder.is_dir():
            raise gone
        try:
            atomic_write_files(folder, {Path(name).name: data for name, data in files.items()})
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(
                    self.data_dir,
                    f"writing the {what} of capture {capture_id}",
                    f"{kept}; export and delete old results or use a larger SD card",
                ) from None
            raise
        with self.connect() as conn:
            counted = conn.execute(
                "UPDATE captures SET bytes = COALESCE(bytes, 0) + ? WHERE id = ?",
                (sum(len(b) for b in files.values()), capture_id),
            ).rowcount
        if not counted:
            remove_folder(folder)
            raise gone

    def recent_captures(self, limit: int = 20, offset: int = 0) -> list[dict]:
        """Newest captures first, each with its cell counts (`CELL_COUNTS`)."""
        with self.read() as conn:
            rows = conn.execute(
                f"SELECT c.*, {CELL_COUNTS} FROM captures c ORDER BY c.id DESC LIMIT ? OFFSET ?",  # noqa: S608
                (limit, offset),
            ).fetchall()
        return [capture_dict(r) for r in rows]

    def count_captures(self) -> int:
        with self.read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM captures").fetchone()[0])

    def get_capture(self, capture_id: int) -> dict | None:
        """One capture with its cells, or None."""
        with self.read() as conn:
            row = conn.execute("SELECT * FROM captures WHERE id = ?", (capture_id,)).fetchone()
            if row is None:
                return None
            cells = conn.execute("SELECT * FROM cells WHERE capture_id = ? ORDER BY idx", (capture_id,)).fetchall()
        cap = capture_dict(row)
        cap["cells"] = [dict(c) for c in cells]
        for c in cap["cells"]:
            c["needs_review"] = bool(c["needs_review"])
            c["positive"] = bool(c["positive"])
            c.pop("dhash", None)  # an implementation detail of the duplicate check
            c["box"] = [c.pop("x0"), c.pop("y0"), c.pop("x1"), c.pop("y1")]
        cap["n_cells"] = len(cells)
        return cap

    def add_note(self, capture_id: int, note: str) -> None:
        """Append a note found after the result (the scale check's warning) to a capture's message."""
        with self.connect() as conn:
            conn.execute("UPDATE captures SET message = message || ' (' || ? || ')' WHERE id = ?", (note, capture_id))

    def image_file(self, kind: str, item_id: int) -> Path | None:
        """Resolve a stored image by id: kind is 'field' (capture id), 'crop' or 'heatmap' (cell id)."""
        column, table = {
            "field": ("field_file", "captures"),
            "crop": ("crop_file", "cells"),
            "heatmap": ("heatmap_file", "cells"),
        }.get(kind, (None, None))
        if column is None:
            return None
        with self.read() as conn:
            row = conn.execute(f"SELECT {column} FROM {table} WHERE id = ?", (item_id,)).fetchone()  # noqa: S608 (fixed names)
        if row is None:
            return None
        path = (self.images_dir / row[0]).resolve()
        return path if path.is_relative_to(self.images_dir.resolve()) else None

    def search_captures(
        self,
        *,
        slide_id: str | None = None,
        label: str | None = None,
        needs_review: bool | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[int, list[dict]]:
        """Filtered captures, newest first: (total matching, one page).

        label: captures with at least one cell whose current verdict is that label.
        needs_review: True = captures with a flagged cell nobody has reviewed yet (a review of another copy of
        the same cell counts, device.store.duplicates); False = captures without one.
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
        if label:
            clauses.append(f"""EXISTS (SELECT 1 FROM cells k LEFT JOIN reviews r ON r.id = {group_latest_review("k")}
                               WHERE k.capture_id = c.id AND COALESCE(r.label, k.label) = ?)""")
            args.append(label)
        if needs_review is not None:
            pending = f"""EXISTS (SELECT 1 FROM cells k
                          WHERE k.capture_id = c.id AND k.needs_review = 1 AND NOT {group_reviewed("k")})"""
            clauses.append(pending if needs_review else f"NOT {pending}")
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self.read() as conn:
            total = int(conn.execute(f"SELECT COUNT(*) FROM captures c{where}", args).fetchone()[0])  # noqa: S608
            rows = conn.execute(
                f"SELECT c.*, {CELL_COUNTS} FROM captures c{where} ORDER BY c.id DESC LIMIT ? OFFSET ?",  # noqa: S608
                (*args, limit, offset),
            ).fetchall()
        return total, [capture_dict(r) for r in rows]

    def recent_timings(self, limit: int = 200) -> list[dict]:
        """Stage timings (ms) of the newest captures, newest first."""
        with self.read() as conn:
            rows = conn.execute("SELECT timings_json FROM captures ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [json.loads(r[0] or "{}") for r in rows]


def capture_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    for key in ("qc", "timings", "camera"):
        d[key] = json.loads(d.pop(f"{key}_json") or "{}")
    d["model_synthetic"] = bool(d["model_synthetic"])
    return d
