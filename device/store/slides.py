"""Slides: the captures of one smear, their counts, blast fraction and provenance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from device.errors import ConflictError, InputError, NotFoundError
from device.stats import wilson_ci
from device.store.duplicates import group_flagged, group_latest_review, group_reviewed

REVIEWED = group_reviewed("k")
FLAGGED = group_flagged("k")


class SlideQueries:
    """Store methods for slides (mixed into device.store.Store)."""

    def ensure_slide(self, slide_id: str) -> None:
        """Create the slide row if it does not exist yet (a new slide from the dashboard or a long press)."""
        with self.connect() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO slides (id, created_at) VALUES (?, ?)",
                (slide_id, datetime.now(UTC).isoformat(timespec="milliseconds")),
            )

    def slide_summary(self, slide_id: str) -> dict | None:
        """Counts, the blast fraction with its 95% Wilson CI, and how many cells await review.

        Each cell counts once: repeats of an earlier cell of the slide (`duplicates`, device.store.duplicates)
        are left out of cells, positive, the blast fraction and the review counts. needs_review: cells the
        model flagged that nobody has reviewed yet (what "flagged for review" shows; it goes down as cells are
        reviewed, like `/api/captures?review=pending`); flagged: all the model flagged; unreviewed: cells
        nobody has reviewed, flagged or not (what marking the slide reviewed asks to confirm).
        """
        with self.read() as conn:
            slide = conn.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone()
            if slide is None:
                return None
            caps = conn.execute(
                """SELECT COUNT(*) AS captures, COALESCE(SUM(status = 'ok'), 0) AS ok_captures
                   FROM captures WHERE slide_id = ?""",
                (slide_id,),
            ).fetchone()
            row = conn.execute(
                f"""SELECT COUNT(*) AS cells,
                          COALESCE(SUM(k.positive), 0) AS positive,
                          COALESCE(SUM({FLAGGED}), 0) AS flagged,
                          COALESCE(SUM({FLAGGED} AND NOT {REVIEWED}), 0) AS needs_review,
                          COALESCE(SUM(NOT {REVIEWED}), 0) AS unreviewed
                   FROM cells k JOIN captures c ON c.id = k.capture_id
                   WHERE c.slide_id = ? AND k.duplicate_of IS NULL""",  # noqa: S608 (fixed SQL)
                (slide_id,),
            ).fetchone()
            duplicates = conn.execute(
                """SELECT COUNT(*) FROM cells k JOIN captures c ON c.id = k.capture_id
                   WHERE c.slide_id = ? AND k.duplicate_of IS NOT NULL""",
                (slide_id,),
            ).fetchone()[0]
        cells, positive = int(row["cells"]), int(row["positive"])
        lo, hi = wilson_ci(positive, cells) if cells else (None, None)
        return {
            "id": slide["id"],
            "created_at": slide["created_at"],
            "reviewed_at": slide["reviewed_at"],
            "reviewed_by": slide["reviewed_by"],
            "captures": int(caps["captures"]),
            "ok_captures": int(caps["ok_captures"]),
            "cells": cells,
            "positive": positive,
            "needs_review": int(row["needs_review"]),
            "flagged": int(row["flagged"]),
            "unreviewed": int(row["unreviewed"]),
            "duplicates": int(duplicates),
            "blast_fraction": positive / cells if cells else None,
            "blast_fraction_ci95": [lo, hi] if cells else None,
        }

    def list_slides(self, limit: int = 50) -> list[dict]:
        with self.read() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM slides ORDER BY created_at DESC LIMIT ?", (limit,))]
        return [self.slide_summary(i) for i in ids]

    def unreviewed_cells(self, slide_id: str, conn=None) -> int:
        """Cells of the slide (each counted once) that nobody has reviewed yet."""
        if conn is None:
            with self.read() as conn:
                return self.unreviewed_cells(slide_id, conn)
        return int(
            conn.execute(
                f"""SELECT COUNT(*) FROM cells k JOIN captures c ON c.id = k.capture_id
                    WHERE c.slide_id = ? AND k.duplicate_of IS NULL AND NOT {REVIEWED}""",  # noqa: S608 (fixed SQL)
                (slide_id,),
            ).fetchone()[0]
        )

    def mark_slide_reviewed(self, slide_id: str, by: str, confirm_unreviewed: int | None = None) -> None:
        """Record that a person reviewed the slide (which makes its captures eligible for retention).

        While cells of the slide are not reviewed (`unreviewed` in the summary), this is refused with an
        ConflictError that says how many, unless `confirm_unreviewed` equals that number now: a confirmation
        given for another number (cells came in or were reviewed meanwhile) is refused too. Retention never
        deletes a capture with an unreviewed cell either way (device.store.upkeep).

        Raises:
            NotFoundError: no such slide. ConflictError (409): unreviewed cells without a matching confirmation.
        """
        if confirm_unreviewed is not None and (
            isinstance(confirm_unreviewed, bool) or not isinstance(confirm_unreviewed, int) or confirm_unreviewed < 0
        ):
            raise InputError("confirm_unreviewed: give the number of unreviewed cells (a whole number, 0 or more)")
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")  # counted and marked under the write lock: no cell comes in between
            if conn.execute("SELECT 1 FROM slides WHERE id = ?", (slide_id,)).fetchone() is None:
                raise NotFoundError(f"no slide {slide_id!r}")
            n = self.unreviewed_cells(slide_id, conn)
            if n and confirm_unreviewed is None:
                raise ConflictError(
                    f"slide {slide_id!r} has {n} unreviewed cell(s): review them first, or confirm that you mark it "
                    f"reviewed with {n} cell(s) unreviewed (confirm_unreviewed={n})"
                )
            if confirm_unreviewed is not None and confirm_unreviewed != n:
                now = f"{n} unreviewed cell(s) now" if n else "no unreviewed cells now"
                todo = (
                    f"look again, then confirm confirm_unreviewed={n}" if n else "mark it reviewed without confirming"
                )
                raise ConflictError(f"slide {slide_id!r} has {now}, not {confirm_unreviewed} as confirmed: {todo}")
            conn.execute(
                "UPDATE slides SET reviewed_at = ?, reviewed_by = ? WHERE id = ?",
                (datetime.now(UTC).isoformat(timespec="seconds"), by, slide_id),
            )

    def slide_cells(
        self, slide_id: str | None = None, reviewed_only: bool = False, include_duplicates: bool = False
    ) -> list[dict]:
        """Cells (of one slide, or all) with the model's result and the current verdict, oldest first.

        Each cell once: repeats of an earlier cell (`duplicate_of`) only with include_duplicates. The
        current verdict is the newest review of the cell or of any copy of it (device.store.duplicates).
        """
        sql = f"""SELECT k.id AS cell_id, k.capture_id, k.idx, k.x0, k.y0, k.x1, k.y1, k.probability,
                        k.label AS model_label, k.needs_review, k.crop_file, k.duplicate_of, c.slide_id,
                        c.created_at AS captured_at, c.model_sha256, c.model_synthetic, c.source, r.label AS reviewed_label,
                        r.reviewer, r.created_at AS reviewed_at, r.action
                 FROM cells k JOIN captures c ON c.id = k.capture_id
                 LEFT JOIN reviews r ON r.id = {group_latest_review("k")}"""  # noqa: S608 (fixed SQL)
        clauses, args = [], []
        if slide_id is not None:
            clauses.append("c.slide_id = ?")
            args.append(slide_id)
        if reviewed_only:
            clauses.append("r.id IS NOT NULL")
        if not include_duplicates:
            clauses.append("k.duplicate_of IS NULL")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self.read() as conn:
            rows = conn.execute(sql + " ORDER BY k.capture_id, k.idx", args).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["box"] = [d.pop("x0"), d.pop("y0"), d.pop("x1"), d.pop("y1")]
            d["needs_review"] = bool(d["needs_review"])
            d["verdict"] = d["reviewed_label"] or d["model_label"]
            out.append(d)
        return out

    def slide_ids(self, limit: int = 500) -> list[str]:
        """Slide IDs, newest first (cheap: for pickers that need no counts)."""
        with self.read() as conn:
            return [r[0] for r in conn.execute("SELECT id FROM slides ORDER BY created_at DESC LIMIT ?", (limit,))]

    def slide_provenance(self, slide_id: str) -> dict:
        """Which models and cameras made a slide's results, and its quality-check summary."""
        with self.read() as conn:
            rows = conn.execute(
                "SELECT model_sha256, model_synthetic, camera_json, qc_json, status FROM captures WHERE slide_id = ?",
                (slide_id,),
            ).fetchall()
        models = sorted({r["model_sha256"] for r in rows})
        cameras = sorted({json.dumps(json.loads(r["camera_json"] or "{}"), sort_keys=True) for r in rows})
        focus = [json.loads(r["qc_json"] or "{}").get("focus") for r in rows]
        focus = [f for f in focus if isinstance(f, int | float)]
        return {
            "model_sha256": models,
            "synthetic": any(r["model_synthetic"] for r in rows),
            "cameras": [json.loads(c) for c in cameras],
            "qc": {
                "captures": len(rows),
                "retake": sum(r["status"] == "retake" for r in rows),
                "error": sum(r["status"] == "error" for r in rows),
                "focus_min": min(focus) if focus else None,
                "focus_median": sorted(focus)[len(focus) // 2] if focus else None,
            },
        }
