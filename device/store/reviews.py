"""Reviews: a person's verdicts on cells, append-only (a cell's current verdict is its newest review)."""

from __future__ import annotations

from datetime import UTC, datetime

from device.errors import InputError, NotFoundError
from device.store.duplicates import group_latest_review

REVIEW_LABELS = ("blast", "normal")


class ReviewQueries:
    """Store methods for reviews (mixed into device.store.Store)."""

    def get_cell(self, cell_id: int) -> dict | None:
        """One cell row with its capture's slide, or None."""
        with self.read() as conn:
            row = conn.execute(
                """SELECT k.*, c.slide_id FROM cells k JOIN captures c ON c.id = k.capture_id
                                  WHERE k.id = ?""",
                (cell_id,),
            ).fetchone()
        return None if row is None else dict(row)

    def add_review(self, cell_id: int, label: str, reviewer: str, note: str = "") -> dict:
        """Append a person's verdict on a cell. Raises NotFoundError (no such cell) or InputError (bad label/name).

        There is no method that changes or deletes a review: history only grows, and the
        current verdict of a cell is its newest review.
        """
        if label not in REVIEW_LABELS:
            raise InputError(f"label {label!r}: use one of {', '.join(REVIEW_LABELS)}")
        reviewer = (reviewer or "").strip()
        if not reviewer or len(reviewer) > 64:
            raise InputError("reviewer: give a name of 1-64 characters")
        cell = self.get_cell(cell_id)
        if cell is None:
            raise NotFoundError(f"no cell {cell_id}")
        row = {
            "cell_id": cell_id,
            "capture_id": cell["capture_id"],
            "slide_id": cell["slide_id"],
            "label": label,
            "model_label": cell["label"],
            "action": "confirm" if label == cell["label"] else "reclassify",
            "reviewer": reviewer,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "note": (note or "")[:500],
        }
        with self.connect() as conn:
            cur = conn.execute(
                f"INSERT INTO reviews ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
            row["id"] = int(cur.lastrowid)
        return row

    def review_history(
        self,
        *,
        cell_id: int | None = None,
        capture_id: int | None = None,
        slide_id: str | None = None,
        limit: int = 1000,
    ) -> list[dict]:
        """Review rows (oldest first) of one cell, capture or slide; with none given, the newest `limit`."""
        where, arg = next(
            (
                (c, a)
                for c, a in (("cell_id", cell_id), ("capture_id", capture_id), ("slide_id", slide_id))
                if a is not None
            ),
            (None, None),
        )
        if where is None:
            with self.read() as conn:
                rows = conn.execute(
                    "SELECT * FROM (SELECT * FROM reviews ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,)
                ).fetchall()
            return [dict(r) for r in rows]
        with self.read() as conn:
            rows = conn.execute(
                f"SELECT * FROM reviews WHERE {where} = ? ORDER BY id LIMIT ?",  # noqa: S608
                (arg, limit),
            ).fetchall()
        return [dict(r) for r in rows]

    def current_reviews(self, capture_id: int) -> dict[int, dict]:
        """The newest review of each reviewed cell of a capture, by the capture's cell id.

        A cell stored twice in a slide (`duplicate_of`, device.store.duplicates) is reviewed once: its
        current review is the newest review of any copy (the row's own cell_id says which copy).
        """
        with self.read() as conn:
            rows = conn.execute(
                f"""SELECT k.id AS this_cell, r.* FROM cells k JOIN reviews r ON r.id = {group_latest_review("k")}
                    WHERE k.capture_id = ?""",  # noqa: S608 (fixed SQL)
                (capture_id,),
            ).fetchall()
        out = {}
        for row in rows:
            d = dict(row)
            out[int(d.pop("this_cell"))] = d
        return out
