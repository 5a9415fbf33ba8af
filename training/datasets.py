"""Dataset readers: (path, label, subject) samples from folders on disk.

Readers here: the C-NMC 2019 layout (labels and subject IDs from the file
names, `UID_<subject>_<image>_<cell>_<all|hem>.bmp`) and plain
folder-per-class datasets. Images are loaded through the device's own decoder
and `prepare_cell`, so training sees exactly what the Pi will feed the model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.errors import ImageError, LeukoCamError
from device.imaging import decode_image
from device.preprocess import PreprocessContract, prepare_cell

CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp$", re.IGNORECASE)
IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
POSITIVE_DIRS = {"all", "blast", "blasts", "leukemic", "malignant", "1"}
NEGATIVE_DIRS = {"hem", "normal", "healthy", "benign", "0"}
LABELS = ("normal", "blast")


class DatasetError(LeukoCamError):
    """The dataset cannot be used as given."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    """1 = leukemic blast (C-NMC "all"), 0 = normal (C-NMC "hem")."""
    subject: str | None
    """Patient / subject ID when the dataset records it, else None."""


def read_dataset(root: str | Path) -> list[Sample]:
    """Read a C-NMC style tree or a folder-per-class tree under root."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; pass the folder that holds the images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    samples = []
    for p in files:
        m = CNMC_NAME.match(p.name)
        if m:
            samples.append(Sample(p, 1 if m.group(4).lower() == "all" else 0, m.group(1)))
            continue
        parent = p.parent.name.lower()
        if parent in POSITIVE_DIRS:
            samples.append(Sample(p, 1, None))
        elif parent in NEGATIVE_DIRS:
            samples.append(Sample(p, 0, None))
    if not samples:
        raise DatasetError(
            f"{root}: no labelled images; use C-NMC names (UID_<subject>_<image>_<cell>_<all|hem>.bmp) "
            f"or class folders named one of {sorted(POSITIVE_DIRS)} / {sorted(NEGATIVE_DIRS)}"
        )
    counts = Counter(s.label for s in samples)
    if len(counts) < 2:
        only = LABELS[next(iter(counts))]
        raise DatasetError(f"{root}: every image is '{only}'; training needs both blast and normal cells")
    return samples


def summarize(samples: list[Sample]) -> dict:
    """Counts per class and per subject, for reports and bundles."""
    per_class = Counter(LABELS[s.label] for s in samples)
    subjects = {s.subject for s in samples if s.subject is not None}
    return {
        "images": len(samples),
        "per_class": dict(sorted(per_class.items())),
        "subjects": len(subjects),
        "subject_ids_known": len(subjects) > 0 and all(s.subject is not None for s in samples),
    }


def load_images(samples: list[Sample], contract: PreprocessContract, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[Sample], list[str]]:
    """Decode and prepare images. Unreadable files are skipped and listed, never fatal.

    Returns:
        (images uint8 N x S x S x 3, labels int N, kept samples, problems)
    """
    size = contract.input_size
    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    kept, problems = [], []
    for s in tqdm(samples, desc="loading images", unit="img", disable=not progress or len(samples) < 200):
        try:
            images[len(kept)] = prepare_cell(decode_image(s.path), contract)
        except ImageError as exc:
            problems.append(str(exc))
            continue
        kept.append(s)
    labels = np.array([s.label for s in kept], dtype=np.int32)
    return images[: len(kept)], labels, kept, problems


def split_by_subject(samples: list[Sample], fractions: dict[str, float], seed: int = 0) -> dict[str, list[Sample]]:
    """Split into named parts so that no subject is in two parts, stratified by each subject's majority label.

    Without subject IDs every image is its own group: the split is by image,
    which can leak a patient between parts and inflate scores.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Sample]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.subject if s.subject is not None else f"image-{i}", []).append(s)
    parts: dict[str, list[Sample]] = {name: [] for name in fractions}
    total = sum(fractions.values())
    for label in (0, 1):
        keys = sorted(k for k, g in groups.items() if round(np.mean([s.label for s in g])) == label)
        rng.shuffle(keys)
        start = 0
        names = list(fractions)
        for j, name in enumerate(names):
            n = len(keys) - start if j == len(names) - 1 else int(round(len(keys) * fractions[name] / total))
            for k in keys[start : start + n]:
                parts[name].extend(groups[k])
            start += n
    return parts
