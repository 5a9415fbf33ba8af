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
    crop_png: bytes
    """The model's input, lossless."""
    heatmap_jpeg: bytes
    """The crop with its CAM overlaid, for people."""


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


@dataclass(frozen=True)
class ReconcileReport:
    orphan_dirs: tuple[str, ...]
    """Image folders with no capture row (e.g. a power cut between files and commit). Kept, not deleted."""
    missing_files: tuple[str, ...]
    """Files that rows point to but that are not on disk."""
    temp_files: tuple[str, ...]
    """Half-written temp files from an interrupted write; never counted as results."""

    @property
    def clean(self) -> bool:
        return not (self.orphan_dirs or self.missing_files or self.temp_files)

    def summary(self) -> str:
        if self.clean:
            return "store consistent"
        return (
            f"store reconcile: {len(self.orphan_dirs)} image folder(s) without a capture row, "
            f"{len(self.missing_files)} missing file(s), {len(self.temp_files)} interrupted temp file(s); "
            "nothing was deleted (see the status page)"
        )
