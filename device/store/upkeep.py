"""Keeping the store within bounds and honest: retention under a size cap, and the start-up check.

The start-up check (`reconcile`) moves crash leftovers, never deletes them: image folders that no
capture row refers to and half-written `*.tmp` files go to `<data_dir>/quarantine/<UTC time>/`,
under the same relative paths (images/...), with a README.txt that says what they are and how to
put them back. It is a rename on the same file system, so nothing is copied and nothing can be
half moved. The quarantine is outside images/: it never counts as results nor toward retention.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from device.errors import LeukoCamError, StoreFullError
from device.store.duplicates import group_reviewed
from device.store.files import is_disk_full, remove_folder
from device.store.records import ReconcileReport

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
LEFTOVER_MIN_AGE_S = 30.0
"""Leftovers changed more recently than this may belong to a capture another process is writing: left for later."""

QUARANTINE_README = """LeukoCam quarantine: crash leftovers, moved here on {when} (UTC)

At start-up LeukoCam found files under {images_dir} that no stored result refers to,
and moved them here instead of deleting them:

- image folders without a capture row: a power cut or crash came after the capture's
  images were written but before its result was committed, so the result was never stored;
- *.tmp files: a file write that was interrupted half way (the finished file never replaced
  the old one).

Nothing that a stored result refers to was moved. LeukoCam never showed these files as
results, and they do not count toward the store's size limit (retention).

Moved, with their paths relative to {data_dir} kept:
{items}

To restore an item, move it back to the same path, e.g.
  mv "{example_src}" "{example_dst}"
There is still no result row for it, so the next start-up moves it here again: to keep an
image, copy it somewhere else instead. When you no longer need these files, delete this folder.
"""


class Upkeep:
    """Store methods for retention and reconciliation (mixed into device.store.Store)."""

    def images_bytes(self) -> int:
        """Bytes of all stored images, from the per-capture sizes recorded as they were written."""
        with self.read() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM captures").fetchone()[0])

    def apply_retention(self, max_images_mb: float) -> dict:
        """Delete the oldest fully reviewed captures of REVIEWED slides until the images fit max_images_mb.

        A capture is deleted only when its slide is marked reviewed AND every one of its cells has been
        reviewed (that cell, or another copy of the same cell: device.store.duplicates): a slide marked
        reviewed with cells left unreviewed keeps those captures. Captures without cells (retakes) of a
        reviewed slide may go. Results nobody has reviewed are never deleted, even when that leaves the
        store over the cap (the status page then says so). Rows go first, in one transaction, then the
        files, so a crash in between leaves orphan files (reported by reconcile), never rows without files.
        """
        used = self.images_bytes()
        cap = max_images_mb * 1e6
        deleted = []
        if used > cap:
            # Reviews are append-only and slides are never un-reviewed: a capture that qualifies now still does
            # when its turn comes below.
            with self.read() as conn:
                candidates = conn.execute(
                    f"""SELECT c.id, c.field_file, c.bytes FROM captures c JOIN slides s ON s.id = c.slide_id
                       WHERE s.reviewed_at IS NOT NULL
                         AND NOT EXISTS (SELECT 1 FROM cells k WHERE k.capture_id = c.id AND NOT {group_reviewed("k")})
                       ORDER BY c.id"""  # noqa: S608 (fixed SQL)
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

    def reconcile(self, min_age_s: float = LEFTOVER_MIN_AGE_S) -> ReconcileReport:
        """Compare rows and files; move crash leftovers into quarantine (deleting nothing) and report.

        Leftovers are image folders without a capture row and `*.tmp` files. Those changed in the
        last `min_age_s` seconds are left in place (a capture may be in progress in another process)
        and moved by a later start-up. Files that rows point to but that are gone are reported only.
        Never raises for a leftover it cannot move (full disk, another file system): it reports it.
        """
        orphans, missing, temps = self._scan()
        report = ReconcileReport(orphans, missing, temps)
        if orphans or temps:
            report = self._quarantine(report, min_age_s)
        if not report.clean:
            log.warning(report.summary())
        return report

    def _scan(self, conn: sqlite3.Connection | None = None) -> tuple[tuple[str, ...], ...]:
        """(orphan folders, missing files, temp files), paths relative to images/."""
        if conn is None:
            with self.read() as conn:
                return self._scan(conn)
        rows = conn.execute("SELECT field_file FROM captures").fetchall()
        cell_files = conn.execute("SELECT crop_file, heatmap_file FROM cells").fetchall()
        referenced = [r[0] for r in rows] + [f for r in cell_files for f in r]
        known_dirs = {str(Path(f).parent) for f in referenced}
        dirs = {str(p.relative_to(self.images_dir)) for p in self.images_dir.glob("*/*/*/*") if p.is_dir()}
        orphans = tuple(sorted(dirs - known_dirs))
        missing = tuple(f for f in referenced if not (self.images_dir / f).is_file())
        temps = tuple(sorted(str(p.relative_to(self.images_dir)) for p in self.images_dir.rglob("*.tmp")))
        return orphans, missing, temps

    def _quarantine(self, report: ReconcileReport, min_age_s: float) -> ReconcileReport:
        """Move the report's leftovers that are old enough into a new quarantine folder; the updated report."""
        found = [*report.orphan_dirs, *(t for t in report.temp_files if not _inside(t, report.orphan_dirs))]
        try:
            # The write lock: a capture committing now (in another process) waits, and checks afterwards that its
            # folder is still there; a capture committed before we got the lock is seen by the scan below.
            with self.connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                orphans, _, temps = self._scan(conn)
                still = set(orphans) | set(temps)
                now = time.time()
                due = [rel for rel in found if rel in still and now - _newest_mtime(self.images_dir / rel) >= min_age_s]
                recent = [rel for rel in found if rel in still and rel not in due]
                moved, folder, problem = self._move_to_quarantine(due) if due else ((), None, "")
        except (OSError, sqlite3.Error, LeukoCamError) as exc:
            log.warning("store reconcile: could not quarantine leftovers: %s", exc)
            full = isinstance(exc, StoreFullError) or (isinstance(exc, OSError) and is_disk_full(exc))
            why = "the disk is full" if full else str(exc)
            return ReconcileReport(
                report.orphan_dirs, report.missing_files, report.temp_files, (), "", tuple(found), f"not moved: {why}"
            )
        notes = []
        if recent:
            notes.append(f"changed in the last {min_age_s:.0f} s, maybe a capture in progress")
        if problem:
            notes.append(problem)
        left = tuple(rel for rel in found if rel not in moved)
        return ReconcileReport(
            report.orphan_dirs,
            report.missing_files,
            report.temp_files,
            moved,
            str(folder) if moved else "",
            left,
            "; ".join(notes) if left else "",
        )

    def _move_to_quarantine(self, items: list[str]) -> tuple[tuple[str, ...], Path | None, str]:
        """Rename items (relative to images/) into a new quarantine folder: (moved, folder, problem)."""
        stamp = datetime.now(UTC)
        root = self.data_dir / QUARANTINE_DIR
        folder = root / stamp.strftime("%Y%m%dT%H%M%SZ")
        n = 1
        while folder.exists():
            n += 1
            folder = root / f"{stamp:%Y%m%dT%H%M%SZ}-{n}"
        folder.mkdir(parents=True)
        readme = folder / "README.txt"
        try:  # the README first: nothing is ever moved without a note saying what it is
            readme.write_text(self._quarantine_readme(folder, stamp, items))
        except OSError:
            readme.unlink(missing_ok=True)
            folder.rmdir()
            raise
        moved, failed = [], []
        for rel in items:
            src, dst = self.images_dir / rel, folder / self.images_dir.name / rel
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists():
                    raise FileExistsError(errno.EEXIST, "already in quarantine", str(dst))
                os.replace(src, dst)  # a rename: same file system, nothing copied
                moved.append(rel)
            except OSError as exc:
                failed.append(f"{rel}: {exc.strerror or exc}")
                log.warning("store reconcile: could not move %s into quarantine: %s", src, exc)
        if failed:
            try:
                readme.write_text(self._quarantine_readme(folder, stamp, moved, failed))
            except OSError:
                pass
        if not moved:  # nothing in it but the README and empty folders: take it away again
            readme.unlink(missing_ok=True)
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                _rmdir_if_empty(sub)
            _rmdir_if_empty(folder)
        problem = ""
        if failed:
            xdev = any("cross-device" in f.lower() for f in failed)
            problem = "could not move: " + (
                "images/ is on another file system than the quarantine" if xdev else failed[0]
            )
        if moved:
            log.info("store reconcile: moved %d leftover(s) into %s", len(moved), folder)
        return tuple(moved), folder, problem

    def _quarantine_readme(self, folder: Path, when: datetime, items: list[str], failed: list[str] = ()) -> str:
        images = self.images_dir.name
        text = QUARANTINE_README.format(
            when=when.isoformat(timespec="seconds"),
            images_dir=self.images_dir,
            data_dir=self.data_dir,
            items="\n".join(f"  {images}/{rel}" for rel in items) or "  (nothing)",
            example_src=folder / images / items[0] if items else folder,
            example_dst=(self.images_dir / items[0]).parent if items else self.images_dir,
        )
        if failed:
            text += "\nFound but NOT moved (still in place):\n" + "\n".join(f"  {images}/{f}" for f in failed) + "\n"
        return text


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # fails, and so removes nothing, unless the folder is empty
    except OSError:
        pass


def _inside(rel: str, folders) -> bool:
    return any(rel.startswith(d + "/") for d in folders)


def _newest_mtime(path: Path) -> float:
    """The newest modification time of path and, for a folder, of everything in it (0 when it is gone)."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.rglob("*")]
    except OSError:
        return 0.0
    return max(times)
