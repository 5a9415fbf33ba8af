"""Keeping the store within bounds and honest: retention under a size cap, and the start-up check."""

from __future__ import annotations

import logging
from pathlib import Path

from device.store.files import remove_folder
from device.store.records import ReconcileReport

log = logging.getLogger(__name__)


class Upkeep:
    """Store methods for retention and reconciliation (mixed into device.store.Store)."""

    def images_bytes(self) -> int:
        """Bytes of all stored images, from the per-capture sizes recorded as they were written."""
        with self.connect() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM captures").fetchone()[0])

    def apply_retention(self, max_images_mb: float) -> dict:
        """Delete the oldest captures of REVIEWED slides until the images fit max_images_mb.

        Results of slides nobody has reviewed are never deleted, even when that
        leaves the store over the cap (the status page then says so). Rows go
        first, in one transaction, then the files, so a crash in between leaves
        orphan files (reported by reconcile), never rows without files.
        """
        used = self.images_bytes()
        cap = max_images_mb * 1e6
        deleted = []
        if used > cap:
            with self.connect() as conn:
                candidates = conn.execute(
                    """SELECT c.id, c.field_file, c.bytes FROM captures c JOIN slides s ON s.id = c.slide_id
                       WHERE s.reviewed_at IS NOT NULL ORDER BY c.id"""
                ).fetchall()
            for row in candidates:
                if used <= cap:
                    break
                with self.connect() as conn:
                    conn.execute("DELETE FROM cells WHERE capture_id = ?", (row["id"],))
                    conn.execute("DELETE FROM captures WHERE id = ?", (row["id"],))
                remove_folder((self.images_dir / row["field_file"]).parent)
                used -= row["bytes"] or 0
                deleted.append(int(row["id"]))
        if deleted:
            log.info(
                "retention: deleted %d capture(s) of reviewed slides to stay under %.0f MB", len(deleted), max_images_mb
            )
        return {"deleted": deleted, "images_mb": round(used / 1e6, 1), "cap_mb": max_images_mb, "over_cap": used > cap}

    def reconcile(self) -> ReconcileReport:
        """Compare rows and files. Reports problems; deletes nothing."""
        with self.connect() as conn:
            rows = conn.execute("SELECT uid, field_file FROM captures").fetchall()
            cell_files = conn.execute("SELECT crop_file, heatmap_file FROM cells").fetchall()
        known_dirs = {str(Path(r["field_file"]).parent) for r in rows}
        dirs = {str(p.relative_to(self.images_dir)) for p in self.images_dir.glob("*/*/*/*") if p.is_dir()}
        orphans = tuple(sorted(dirs - known_dirs))
        referenced = [r["field_file"] for r in rows] + [f for r in cell_files for f in r]
        missing = tuple(f for f in referenced if not (self.images_dir / f).is_file())
        temps = tuple(sorted(str(p.relative_to(self.images_dir)) for p in self.images_dir.rglob("*.tmp")))
        report = ReconcileReport(orphans, missing, temps)
        if not report.clean:
            log.warning(report.summary())
        return report
