"""What the store takes in (records) and reports (the start-up consistency check)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CellRecord:
    """One classified cell as it is stored: its numbers and its two encoded images."""

    box: tuple[int, int, int, int]
    probability: float
    logit: float
    label: str
    positive: bool
    needs_review: bool
    crop_png: bytes | None
    """The model's input, lossless; None when it is written after the result (`Store.attach_cell_crops`)."""
    heatmap_jpeg: bytes
    """The crop with its signed CAM overlaid on the capture's fixed scale (device.heatmap), for people."""
    dhash: int | None = None
    """64-bit perceptual hash of the crop (device.store.duplicates.crop_dhash); None = not checked for repeats."""
    crop_nbytes: int = 0
    """The crop's raw size in bytes: what the space check reserves for a crop PNG still to come (crop_png None)."""


@dataclass(frozen=True)
class CaptureRecord:
    """One analysed field as it is stored (see device.pipeline.to_record)."""

    slide_id: str
    source: str
    trigger: str
    status: str
    message: str
    width: int
    height: int
    um_per_px: float | None
    model_sha256: str
    model_synthetic: bool
    field_jpeg: bytes | None
    """The archival field JPEG; None when it is written after the result (`Store.attach_field_image`)."""
    qc: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    camera: dict = field(default_factory=dict)
    cells: tuple[CellRecord, ...] = ()
    cam_scale: float | None = None
    """The |CAM| at which the heatmaps reach full colour (device.heatmap.fixed_cam_scale); None = unknown."""


@dataclass(frozen=True)
class ReconcileReport:
    """What the start-up check found, and which crash leftovers it moved into quarantine (never deleted)."""

    orphan_dirs: tuple[str, ...]
    """Image folders with no capture row (e.g. a power cut between files and commit), relative to images/."""
    missing_files: tuple[str, ...]
    """Files that rows point to but that are not on disk (reported only: nothing can bring them back)."""
    temp_files: tuple[str, ...]
    """Half-written temp files from an interrupted write; never counted as results."""
    quarantined: tuple[str, ...] = ()
    """What was moved (folders and temp files, relative to images/) into `quarantine_dir`."""
    quarantine_dir: str = ""
    """The folder they were moved to (`<data_dir>/quarantine/<UTC time>/`), "" when nothing was moved."""
    left_in_place: tuple[str, ...] = ()
    """Leftovers found but not moved (`note` says why); a later start-up moves them."""
    note: str = ""

    @property
    def clean(self) -> bool:
        return not (self.orphan_dirs or self.missing_files or self.temp_files)

    def summary(self) -> str:
        """One line for the log and the status page."""
        if self.clean:
            return "store consistent"
        parts = []
        if self.orphan_dirs or self.temp_files:
            found = (
                f"{len(self.orphan_dirs)} image folder(s) without a capture row and "
                f"{len(self.temp_files)} interrupted temp file(s)"
            )
            restore = "README.txt there says how to restore them"
            if self.quarantined and not self.left_in_place:
                parts.append(f"moved {found} to {self.quarantine_dir} ({restore}); nothing was deleted")
            elif self.quarantined:
                parts.append(
                    f"found {found}: moved {len(self.quarantined)} to {self.quarantine_dir} ({restore}), left "
                    f"{len(self.left_in_place)} in place ({self.note}) for a later start-up; nothing was deleted"
                )
            else:
                parts.append(
                    f"found {found}, left in place ({self.note or 'not moved'}) for a later start-up; "
                    "nothing was deleted"
                )
        if self.missing_files:
            parts.append(f"{len(self.missing_files)} missing file(s) that stored results point to")
        return "store reconcile: " + "; ".join(parts)
