"""Dataset readers: (path, label, subject) samples from folders on disk.

Readers here:
- C-NMC 2019 training data (labels and subject IDs from the file names,
  `UID_<subject>_<image>_<cell>_<all|hem>.bmp`; healthy subject IDs start with H, and the real data also
  writes one of them `h3`: subject IDs are upper-cased, so `h3` and `H3` are one subject);
- the C-NMC preliminary test folder (numbered .bmp files plus a labels CSV
  `Patient_ID,new_names,labels`: Patient_ID holds the original C-NMC file name,
  from which the subject is taken; label 1 = ALL);
- ALL-IDB2 (`Im001_1.tif`: the suffix after `_` is the label, 1 = blast; no subject IDs);
- a CSV manifest `path,label[,subject]` (label all/hem/blast/normal/1/0; paths relative to the CSV;
  `file` is accepted for `path`, as in exports made before issue #13);
- plain folder-per-class datasets;
- a .zip of any of these folders (the dashboard's export of reviewed cells, as downloaded): read as the
  folder it unpacks to, unpacked once into a cache folder (`unpack_zip`).

Images are loaded through the device's own decoder and `prepare_cell`, so
training sees exactly what the Pi will feed the model. `assign_folds` makes the
subject-grouped held-out split and cross-validation folds (scikit-learn
StratifiedGroupKFold) and `write_folds_csv` records them for leakage audits.

Duplicates: `mark_duplicates` names each image's group of identical or near-identical images
(training/duplicates.py), and both splits (`split_by_subject`, `assign_folds`) group by `split_units`: a
subject, joined with every subject that shares a duplicate group with it, so no group spans two parts.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.errors import ImageError, LeukoCamError
from device.imaging import decode_image
from device.preprocess import PreprocessContract, prepare_cell
from training.duplicates import NEAR_RULE, UnionFind, duplicate_groups, group_hashes, image_phash
from training.duplicates import RULE as DUPLICATE_RULE

CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.(bmp|png)$", re.IGNORECASE)
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
    dup_group: str = ""
    """The image's group of identical or near-identical images ("dup3", set by `mark_duplicates`); "" when it
    has no duplicate or was not checked."""


ALLIDB_NAME = re.compile(r"^Im\d+_([01])\.(tif|tiff|jpg|png|bmp)$", re.IGNORECASE)
CNMC_SUBJECT = re.compile(r"UID_(H?\d+)_", re.IGNORECASE)
PRELIM_COLUMNS = {"patient_id", "new_names", "labels"}
MANIFEST_LABELS = {"all": 1, "blast": 1, "1": 1, "hem": 0, "normal": 0, "0": 0}


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read CSV ({exc})") from None


def read_manifest(csv_path: str | Path) -> list[Sample]:
    """Samples from a CSV manifest `path,label[,subject]`; paths are relative to the CSV's folder.

    Other columns are ignored. A `file` column stands for `path` when there is none: the dashboard's exports
    before issue #13 named it so, and they stay readable.
    """
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path)
    column = "path" if rows and "path" in rows[0] else "file"
    if not rows or not {column, "label"} <= set(rows[0]):
        raise DatasetError(f"{csv_path}: a manifest needs a header with columns path,label[,subject]")
    samples = []
    for n, row in enumerate(rows, start=2):
        label = MANIFEST_LABELS.get(row["label"].lower())
        if label is None:
            raise DatasetError(f"{csv_path} line {n}: label {row['label']!r} is not one of {sorted(MANIFEST_LABELS)}")
        path = Path(row[column])
        samples.append(
            Sample(path if path.is_absolute() else csv_path.parent / path, label, row.get("subject") or None)
        )
    return samples


def _prelim_labels(root: Path) -> dict[Path, Sample]:
    """Samples named by C-NMC preliminary-test label CSVs (`Patient_ID,new_names,labels`) under root."""
    out = {}
    for csv_path in sorted(root.rglob("*.csv")):
        rows = _read_csv(csv_path)
        if not rows or not PRELIM_COLUMNS <= set(rows[0]):
            continue
        for row in rows:
            name = row["new_names"]
            matches = list(csv_path.parent.rglob(name)) if name else []
            if not matches or row["labels"] not in ("0", "1"):
                continue
            m = CNMC_SUBJECT.search(row["patient_id"])
            out[matches[0]] = Sample(matches[0], int(row["labels"]), m.group(1).upper() if m else None)
    return out


CACHE_ENV = "LEUKOCAM_CACHE"
"""Folder for unpacked dataset zips; default $XDG_CACHE_HOME/leukocam or ~/.cache/leukocam."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leukocam"


def unpack_zip(zip_path: str | Path) -> Path:
    """Unpack a dataset zip once into the cache and return that folder.

    The folder is named after the zip and its size and modification time, so every command (train, cv,
    evaluate, convert) that reads the same zip sees the same image paths, and folds.csv stays valid across
    them; a changed zip unpacks afresh. Members that would land outside the folder are refused.
    """
    zip_path = Path(zip_path)
    try:
        st = zip_path.stat()
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{zip_path}: not a readable zip file ({getattr(exc, 'strerror', None) or exc})") from None
    key = hashlib.sha256(f"{zip_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "datasets" / f"{zip_path.stem}-{key}"
    with zf:
        if (target / ".complete").is_file():
            return target
        members = [m for m in zf.infolist() if not m.is_dir()]
        for m in members:
            parts = Path(m.filename.replace("\\", "/")).parts
            if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise DatasetError(f"{zip_path}: member {m.filename!r} would unpack outside its folder; refused")
        target.parent.mkdir(parents=True, exist_ok=True)
        need = sum(m.file_size for m in members)
        free = shutil.disk_usage(target.parent).free
        if need > free:
            raise DatasetError(
                f"{zip_path}: unpacking needs {need / 1e9:.1f} GB and {target.parent} has {free / 1e9:.1f} GB free; "
                f"free space, set {CACHE_ENV} to a bigger disk, or unpack it yourself and pass the folder"
            )
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for m in members:
                zf.extract(m, work)
            (work / ".complete").write_text(str(zip_path.resolve()) + "\n", encoding="utf-8")
            if target.exists() and not (target / ".complete").is_file():
                shutil.rmtree(target, ignore_errors=True)  # what an interrupted earlier unpack left
            os.replace(work, target)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            if (target / ".complete").is_file():  # another process finished it meanwhile
                return target
            raise DatasetError(f"{zip_path}: cannot unpack ({getattr(exc, 'strerror', None) or exc})") from None
    return target


def display_path(path: Path) -> str:
    """A sample's path for people: inside an unpacked zip, shown as <zip>/<member> rather than the cache folder."""
    try:
        rel = path.relative_to(cache_dir() / "datasets")
    except ValueError:
        return str(path)
    marker = cache_dir() / "datasets" / rel.parts[0] / ".complete"
    try:
        source = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return str(path)
    return str(Path(source, *rel.parts[1:]))


def is_zip(root: Path) -> bool:
    return root.suffix.lower() == ".zip" and root.is_file()


def collect_samples(root: str | Path) -> tuple[list[Sample], list[Path]]:
    """All labelled samples under root (a folder, a CSV manifest or a zip), and the image files left unlabelled.

    No class checks: `read_dataset` adds those; `inspect_dataset` reports instead of refusing.
    """
    root = Path(root)
    if is_zip(root):
        folder = unpack_zip(root)
        try:
            return collect_samples(folder)
        except DatasetError as exc:
            raise DatasetError(str(exc).replace(str(folder), str(root))) from None
    if root.is_file() and root.suffix.lower() == ".csv":
        return read_manifest(root), []
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset folder not found; pass the folder that holds the images, a CSV manifest or a .zip of them"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    prelim = _prelim_labels(root)
    samples, unlabelled = [], []
    for p in files:
        m = CNMC_NAME.match(p.name)
        a = ALLIDB_NAME.match(p.name)
        parent = p.parent.name.lower()
        if m:
            samples.append(Sample(p, 1 if m.group(4).lower() == "all" else 0, m.group(1).upper()))
        elif p in prelim:
            samples.append(prelim[p])
        elif a:
            samples.append(Sample(p, int(a.group(1)), None))
        elif parent in POSITIVE_DIRS:
            samples.append(Sample(p, 1, None))
        elif parent in NEGATIVE_DIRS:
            samples.append(Sample(p, 0, None))
        else:
            unlabelled.append(p)
    return samples, unlabelled


def read_dataset(root: str | Path) -> list[Sample]:
    """Read any supported layout under root (see the module docstring); refuses empty or single-class data."""
    root = Path(root)
    samples, _ = collect_samples(root)
    if not samples:
        raise DatasetError(
            f"{root}: no labelled images; use C-NMC names (UID_<subject>_<image>_<cell>_<all|hem>.bmp), "
            "ALL-IDB2 names (Im001_1.tif), a C-NMC labels CSV, a manifest CSV (path,label[,subject]) "
            f"or class folders named one of {sorted(POSITIVE_DIRS)} / {sorted(NEGATIVE_DIRS)}"
        )
    counts = Counter(s.label for s in samples)
    if len(counts) < 2:
        only = LABELS[next(iter(counts))]
        raise DatasetError(f"{root}: every image is '{only}'; training needs both blast and normal cells")
    return samples


def subject_warning(samples: list[Sample]) -> str | None:
    """The loud warning for data without subject IDs, or None when every sample has one."""
    missing = sum(s.subject is None for s in samples)
    if not missing:
        return None
    return (
        f"WARNING: {missing} of {len(samples)} images have no subject ID: those are split by IMAGE, so cells "
        "of one patient can land in both training and test and the scores will be optimistic"
    )


def inspect_dataset(root: str | Path, progress: bool = True) -> dict:
    """Counts per class and subject, image sizes, duplicates and unreadable files; never raises on bad images.

    `duplicates` lists groups of byte-identical files; `near_duplicates` groups of images that are the same
    picture re-encoded, brightened or resized (training/duplicates.py), not all byte-identical.
    """
    samples, unlabelled = collect_samples(root)
    sizes: Counter = Counter()
    by_hash: dict[str, list[str]] = {}
    hashes: list[tuple[str, np.ndarray | None]] = []
    shown: list[str] = []
    unreadable = []
    for s in tqdm(samples, desc="inspecting", unit="img", disable=not progress or len(samples) < 200):
        try:
            data = s.path.read_bytes()
            image = decode_image(data)
        except (OSError, ImageError) as exc:
            why = str(exc).removeprefix("uploaded image: ")  # decode_image got bytes: it cannot name the file
            unreadable.append(f"{display_path(s.path)}: {why}")
            continue
        sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        digest = hashlib.sha256(data).hexdigest()
        by_hash.setdefault(digest, []).append(display_path(s.path))
        hashes.append((digest, image_phash(image)))
        shown.append(display_path(s.path))
    near: dict[int, list[int]] = {}
    for i, g in enumerate(group_hashes(hashes)):
        near.setdefault(g, []).append(i)
    per_subject = Counter(s.subject for s in samples if s.subject is not None)
    per_class = Counter(LABELS[s.label] for s in samples)
    problems = []
    if not samples:
        problems.append("no labelled images")
    elif len(per_class) < 2:
        problems.append(f"single class: every image is '{next(iter(per_class))}'; training needs both classes")
    warning = subject_warning(samples)
    if warning:
        problems.append(warning)
    if len(sizes) > 1:
        problems.append(f"{len(sizes)} different image sizes (fine: crops are resized to the model input)")
    return {
        "root": str(Path(root)),
        "unpacked_to": str(unpack_zip(root)) if is_zip(Path(root)) else None,
        "images": len(samples),
        "per_class": dict(sorted(per_class.items())),
        "subjects": len(per_subject),
        "per_subject": dict(sorted(per_subject.items())),
        "sizes": dict(sizes.most_common()),
        "duplicates": [paths for paths in by_hash.values() if len(paths) > 1],
        "near_duplicates": [
            [shown[i] for i in members] for members in near.values() if len({hashes[i][0] for i in members}) > 1
        ],
        "near_duplicate_rule": NEAR_RULE,
        "unreadable": unreadable,
        "unlabelled": [display_path(p) for p in unlabelled],
        "problems": problems,
    }


def summarize(samples: list[Sample]) -> dict:
    """Counts per class and per subject, and the duplicate groups (`duplicate_summary`), for reports and bundles."""
    per_class = Counter(LABELS[s.label] for s in samples)
    subjects = {s.subject for s in samples if s.subject is not None}
    return {
        "images": len(samples),
        "per_class": dict(sorted(per_class.items())),
        "subjects": len(subjects),
        "subject_ids_known": len(subjects) > 0 and all(s.subject is not None for s in samples),
        "duplicates": duplicate_summary(samples),
    }


def mark_duplicates(samples: list[Sample], progress: bool = True) -> list[Sample]:
    """The samples with `dup_group` set: images with the same bytes or a near-identical picture (a perceptual
    hash within training.duplicates.MAX_DISTANCE bits) share a group; unreadable files only match by bytes."""
    names = duplicate_groups([s.path for s in samples], progress=progress)
    return [replace(s, dup_group=name) for s, name in zip(samples, names, strict=True)]


def split_units(samples: list[Sample]) -> list[str]:
    """Each image's split unit: the groups that `split_by_subject` and `assign_folds` keep whole.

    A unit is a subject (an image without a subject ID is its own unit, "image-<index>"), joined with every
    other unit that shares a duplicate group (`dup_group`) with it, transitively: two images of one group
    never land in two parts, and neither do the other images of their subjects. A unit that is one subject is
    named by it, as before duplicates were grouped (so a dataset without duplicates splits as it did); a joined
    unit by its members, sorted and joined with "+".
    """
    keys = [s.subject if s.subject is not None else f"image-{i}" for i, s in enumerate(samples)]
    index = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    uf = UnionFind(len(index))
    first: dict[str, int] = {}
    for s, key in zip(samples, keys, strict=True):
        if s.dup_group:
            uf.union(index[first.setdefault(s.dup_group, key)], index[key])
    members: dict[int, list[str]] = {}
    for key, n in index.items():
        members.setdefault(uf.find(n), []).append(key)
    name = {key: "+".join(sorted(group)) for group in members.values() for key in group}
    return [name[k] for k in keys]


def duplicate_summary(samples: list[Sample]) -> dict:
    """The duplicate groups: how many, how many images they hold, how many hold images of two or more subjects
    (or subject-less images), how many subjects share a split unit with another subject because of them, and
    how many split units there are."""
    keys = [s.subject if s.subject is not None else f"image-{i}" for i, s in enumerate(samples)]
    groups: dict[str, set] = {}
    for s, key in zip(samples, keys, strict=True):
        if s.dup_group:
            groups.setdefault(s.dup_group, set()).add(key)
    unit_members: dict[str, set] = {}
    for unit, key in zip(split_units(samples), keys, strict=True):
        unit_members.setdefault(unit, set()).add(key)
    return {
        "groups": len(groups),
        "images": sum(1 for s in samples if s.dup_group),
        "groups_across_subjects": sum(1 for members in groups.values() if len(members) > 1),
        "subjects_joined": sum(len(m) for m in unit_members.values() if len(m) > 1),
        "split_units": len(unit_members),
        "rule": DUPLICATE_RULE,
    }


def load_images(
    samples: list[Sample], contract: PreprocessContract, progress: bool = True, um_per_px: float | None = None
) -> tuple[np.ndarray, np.ndarray, list[Sample], list[str]]:
    """Decode and prepare images. Unreadable files are skipped and listed, never fatal.

    `um_per_px` is the images' pixel size: with the contract's crop_um, every image is brought to that
    physical field of view (see `prepare_cell`).

    Returns:
        (images uint8 N x S x S x 3, labels int N, kept samples, problems)
    """
    size = contract.input_size
    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    kept, problems = [], []
    for s in tqdm(samples, desc="loading images", unit="img", disable=not progress or len(samples) < 200):
        try:
            images[len(kept)] = prepare_cell(decode_image(s.path), contract, um_per_px)
        except ImageError as exc:
            problems.append(str(exc))
            continue
        kept.append(s)
    labels = np.array([s.label for s in kept], dtype=np.int32)
    return images[: len(kept)], labels, kept, problems


def subject_groups(samples: list[Sample]) -> list[str] | None:
    """Each image's subject, for subject-level confidence intervals; None when subjects are unknown."""
    if not samples or any(s.subject is None for s in samples):
        return None
    return [s.subject for s in samples]


def largest_side(samples: list[Sample]) -> int:
    """The largest width or height among the images, read from their headers (no decoding)."""
    from PIL import Image

    side = 0
    for s in samples:
        try:
            with Image.open(s.path) as img:
                side = max(side, *img.size)
        except Exception:  # unreadable files are reported by load_images
            continue
    if side == 0:
        raise DatasetError("no readable image to measure")
    return side


def split_by_subject(samples: list[Sample], fractions: dict[str, float], seed: int = 0) -> dict[str, list[Sample]]:
    """Split into named parts so that no subject and no duplicate group is in two parts, stratified by each
    unit's majority label (the units are `split_units`: subjects joined by shared duplicate groups).

    Without subject IDs every image is its own unit (joined with its duplicates): the split is by image,
    which can leak a patient between parts and inflate scores.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Sample]] = {}
    for s, unit in zip(samples, split_units(samples), strict=True):
        groups.setdefault(unit, []).append(s)
    parts: dict[str, list[Sample]] = {name: [] for name in fractions}
    total = sum(fractions.values())
    for label in (0, 1):
        keys = sorted(k for k, g in groups.items() if round(np.mean([s.label for s in g])) == label)
        rng.shuffle(keys)
        start = 0
        names = list(fractions)
        for j, name in enumerate(names):
            n = len(keys) - start if j == len(names) - 1 else int(round(len(keys) * fractions[name] / total))
            if len(keys) >= len(names) and j < len(names) - 1:
                # Every part gets each class when there are enough subjects: a one-class val or test is useless.
                n = min(max(n, 1 if fractions[name] > 0 else 0), len(keys) - start - (len(names) - 1 - j))
            for k in keys[start : start + n]:
                parts[name].extend(groups[k])
            start += n
    return parts


def assign_folds(samples: list[Sample], k: int = 5, test_fraction: float = 0.3, seed: int = 0) -> list[str]:
    """Subject-grouped split names per sample: "test" for the held-out part, "fold0".."fold{k-1}" for the rest.

    Both the held-out split and the folds use scikit-learn's StratifiedGroupKFold over `split_units`, so no
    subject and no duplicate group is in two parts, and the class balance is kept as well as the groups allow.
    The held-out part is one of round(1/test_fraction) grouped folds (0.3 -> 3 folds -> about a third), the
    closest grouped split to the requested fraction.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.array([s.label for s in samples]), np.array(split_units(samples))
    n_groups = len(set(groups))
    n_test = max(2, int(round(1 / test_fraction))) if test_fraction > 0 else 0
    if n_groups < k + (1 if n_test else 0):
        joined = " (subjects that share duplicate images count as one)" if any(s.dup_group for s in samples) else ""
        raise DatasetError(f"{n_groups} subjects{joined} are too few for {k} folds plus a held-out test split")
    names = np.array([""] * len(samples), dtype=object)
    rest = np.arange(len(samples))
    if n_test:
        _, test_idx = next(StratifiedGroupKFold(n_test, shuffle=True, random_state=seed).split(rest, y, groups))
        names[test_idx] = "test"
        rest = np.setdiff1d(rest, test_idx)
    sgkf = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    for fold, (_, idx) in enumerate(sgkf.split(rest, y[rest], groups[rest])):
        names[rest[idx]] = f"fold{fold}"
    return [str(n) for n in names]


def write_folds_csv(path: str | Path, samples: list[Sample], splits: list[str]) -> None:
    """One row per image: path, subject, label, split, dup_group; what anyone needs to audit leakage.

    dup_group names the image's group of identical or near-identical images ("dup3"; every image of a group is
    in the same split), empty for an image without a duplicate.
    """
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "label", "split", "dup_group"])
        for s, name in zip(samples, splits, strict=True):
            w.writerow([str(s.path), s.subject or "", LABELS[s.label], name, s.dup_group])


def read_folds_csv(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
