"""Slides: the captures of one smear, their counts, blast fraction and provenance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from device.errors import NotFoundError
from device.stats import wilson_ci


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
        """Counts, the blast fraction with its 95% Wilson CI, and how many cells await review."""
        with self.read() as conn:
            slide = conn.execute("SELECT * FROM slides WHERE id = ?", (slide_id,)).fetchone()
            if slide is None:
                return None
            row = conn.execute(
                """SELECT COUNT(DISTINCT c.id) AS captures,
                          COUNT(DISTINCT CASE WHEN c.status = 'ok' THEN c.id END) AS ok_captures,
                          COUNT(k.id) AS cells,
                          COALESCE(SUM(k.positive), 0) AS positive,
                          COALESCE(SUM(k.needs_review), 0) AS needs_review
                   FROM captures c LEFT JOIN cells k ON k.capture_id = c.id WHERE c.slide_id = ?""",
                (slide_id,),
            ).fetchone()
        cells, positive = int(row["cells"]), int(row["positive"])
        lo, hi = wilson_ci(positive, cells) if cells else (None, None)
        return {
            "id": slide["id"],
            "created_at": slide["created_at"],
            "reviewed_at": slide["reviewed_at"],
            "reviewed_by": slide["reviewed_by"],
            "captures": int(row["captures"]),
            "ok_captures": int(row["ok_captures"]),
            "cells": cells,
            "positive": positive,
            "needs_review": int(row["needs_review"]),
            "blast_fraction": positive / cells if cells else None,
            "blast_fraction_ci95": [lo, hi] if cells else None,
        }

    def list_slides(self, limit: int = 50) -> list[dict]:
        with self.read() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM slides ORDER BY created_at DESC LIMIT ?", (limit,))]
        return [self.slide_summary(i) for i in ids]

    def mark_slide_reviewed(self, slide_id: str, by: str) -> None:
        """Record that a person reviewed the slide (which makes its captures eligible for retention)."""
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE slides SET reviewed_at = ?, reviewed_by = ? WHERE id = ?",
                (datetime.now(UTC).isoformat(timespec="seconds"), by, slide_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no slide {slide_id!r}")

    def slide_cells(self, slide_id: str | None = None, reviewed_only: bool = False) -> list[dict]:
        """Cells (of one slide, or all) with the model's result and the current verdict, oldest first."""
        sql = """SELECT k.id AS cell_id, k.capture_id, k.idx, k.x0, k.y0, k.x1, k.y1, k.probability, k.label AS model_label,
                        k.needs_review, k.crop_file, c.slide_id, c.created_at AS captured_at, c.model_sha256,
                        c.source, r.label AS reviewed_label, r.reviewer, r.created_at AS reviewed_at, r.action
                 FROM cells k JOIN captures c ON c.id = k.capture_id
                 LEFT JOIN (SELECT cell_id, MAX(id) AS mid FROM reviews GROUP BY cell_id) m ON m.cell_id = k.id
                 LEFT JOIN reviews r ON r.id = m.mid"""
        clauses, args = [], []
        if slide_id is not None:
            clauses.append("c.slide_id = ?")
            args.append(slide_id)
        if reviewed_only:
            clauses.append("r.id IS NOT NULL")
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
