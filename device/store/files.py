"""The image files of captures, each written atomically (temp, fsync, rename).

Each capture owns one folder, images/YYYY/MM/DD/<uid>/, holding field.jpg and,
per cell, cell_NNN.png (the model's input) and cell_NNN_cam.jpg (its heatmap).
The heatmaps are written before the capture's rows commit; the appliance writes
the archival copies (the crop PNGs and field.jpg) just after
(`Store.attach_cell_crops`, `Store.attach_field_image`).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from device.errors import StoreFullError
from device.imaging import atomic_write_files, fsync_dir

FIELD_NAME = "field.jpg"


@dataclass(frozen=True)
class WrittenFiles:
    """Where a capture's files went, relative to the images folder, and their size."""

    field_file: Path
    cell_files: tuple[tuple[Path, Path], ...]
    """(crop, heatmap) per cell."""
    bytes: int


FULL_ADVICE = "nothing was stored; export and delete old results or use a larger SD card"


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_text(folder: Path) -> str:
    """How much space is free where folder lives, for messages."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:.1f} MB free" if free >= 1e6 else f"{free // 1024} KB free"


def disk_full_error(folder: Path, doing: str, advice: str = FULL_ADVICE) -> StoreFullError:
    """The StoreFullError for a full disk met while `doing` something: the free space and what to do."""
    return StoreFullError(f"disk full while {doing} ({free_text(folder)} on {folder}): {advice}")


def write_capture_files(images_dir: Path, rel_dir: Path, field_jpeg: bytes | None, cells) -> WrittenFiles:
    """Write a capture's images under images_dir/rel_dir (each atomically), then fsync the folder.

    On any error the folder is removed again and the error raised (StoreFullError for a full disk).
    """
    folder = images_dir / rel_dir
    try:
        field_file = rel_dir / FIELD_NAME
        data = {} if field_jpeg is None else {FIELD_NAME: field_jpeg}
        cell_files = []
        for i, cell in enumerate(cells):
            crop_name, heat_name = f"cell_{i:03d}.png", f"cell_{i:03d}_cam.jpg"
            data[heat_name] = cell.heatmap_jpeg
            if cell.crop_png is not None:  # None: written after the result (Store.attach_cell_crops)
                data[crop_name] = cell.crop_png
            cell_files.append((rel_dir / crop_name, rel_dir / heat_name))
        atomic_write_files(folder, data)
        total = sum(len(v) for v in data.values())
        fsync_dir(folder.parent)
    except OSError as exc:
        remove_folder(folder)
        if is_disk_full(exc):
            raise disk_full_error(
                images_dir, "writing the capture's images", "partial files removed, " + FULL_ADVICE
            ) from None
        raise
    return WrittenFiles(field_file, tuple(cell_files), total)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in one capture folder (0 when it is gone)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
