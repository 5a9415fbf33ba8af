"""Durable results: SQLite (WAL) for rows, plain files for images.

Write order is what makes a power cut harmless: every image of a capture is
written atomically (temp file, fsync, rename) first, and only then is the
capture committed in one transaction. A crash in between leaves files without
a row, which `reconcile` moves into `<data_dir>/quarantine/<UTC time>/` at
start-up (with a README saying how to restore them; never deleting anything);
it can never leave a row whose files are half written. Disk space is checked
before anything is written, so a full disk refuses a capture and loses nothing;
a disk that fills up anyway refuses every write with StoreFullError while reads
go on working (see `base.py`). A data folder that cannot be used (a file, not
writable, a database that is not one) raises StoreError saying what to do.

Callers use `Store`; the modules are by concern:

| module | what |
| --- | --- |
| `schema.py` | tables, numbered migrations |
| `base.py` | the data folder and its checks, connections (read-only for queries), the disk-space rule |
| `files.py` | a capture's image files, written atomically |
| `records.py` | what is stored (`CaptureRecord`, `CellRecord`) and the start-up report |
| `captures.py` | saving and reading captures and cells |
| `slides.py` | slides: counts, blast fraction, provenance, marking reviewed (confirmed when cells are unreviewed) |
| `reviews.py` | append-only reviews |
| `duplicates.py` | a cell stored twice in a slide (perceptual hash), counted and reviewed once |
| `upkeep.py` | retention under a size cap (only fully reviewed captures), reconcile (and quarantine) at start-up |
"""

from device.store.base import DB_FILE, IMAGES_DIR, StoreBase
from device.store.captures import CaptureQueries
from device.store.records import CaptureRecord, CellRecord, ReconcileReport
from device.store.reviews import REVIEW_LABELS, ReviewQueries
from device.store.schema import MIGRATIONS, SCHEMA_VERSION
from device.store.slides import SlideQueries
from device.store.upkeep import Upkeep

__all__ = [
    "DB_FILE",
    "IMAGES_DIR",
    "MIGRATIONS",
    "REVIEW_LABELS",
    "SCHEMA_VERSION",
    "CaptureRecord",
    "CellRecord",
    "ReconcileReport",
    "Store",
]


class Store(CaptureQueries, SlideQueries, ReviewQueries, Upkeep, StoreBase):
    """The results store under one data folder (see the module table above for where each part lives)."""
