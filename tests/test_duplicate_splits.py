"""Duplicate images never span two splits (issue #11, point 5), and the C-NMC reader on real names (point 6).

A dataset of synthetic cells gets byte-identical, brightened, resized and JPEG-re-encoded copies of some cells
filed under OTHER subjects; the held-out split and every cross-validation fold must keep each group of copies
(and the subjects that share one) on one side, folds.csv must name the groups, and distinct cells must stay
apart. The hash and its bound are checked on the nine real C-NMC cells in tests/data/cnmc-sample.
"""

from __future__ import annotations

import csv
import io
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from device.imaging import decode_image
from training.datasets import (
    assign_folds,
    collect_samples,
    duplicate_summary,
    inspect_dataset,
    mark_duplicates,
    read_dataset,
    read_folds_csv,
    split_by_subject,
    split_units,
    subject_warning,
    write_folds_csv,
)
from training.duplicates import (
    HASH_BITS,
    MAX_DISTANCE,
    group_hashes,
    hash_distance,
    image_phash,
    near_pairs,
)

CNMC_SAMPLE = Path(__file__).resolve().parent / "data" / "cnmc-sample"
FRACTIONS = {"train": 0.55, "val": 0.15, "test": 0.3}


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _brighter(rgb: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(rgb)).enhance(factor))


def _resized(rgb: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))


# -- the C-NMC reader on the real names -------------------------------------------------------------------------


def test_cnmc_reader_on_real_names_reads_lower_case_h3_as_healthy_subject_H3():
    samples = read_dataset(CNMC_SAMPLE)
    by_name = {s.path.stem: s for s in samples}
    assert len(samples) == 9
    assert {name for name, s in by_name.items() if s.label == 1} == {
        "UID_1_3_1_all",
        "UID_1_8_1_all",
        "UID_1_9_1_all",
        "UID_78_9_7_all",
    }
    assert all(s.label == 0 for name, s in by_name.items() if name.endswith("_hem"))
    # h3 is the healthy subject H3, cased like H6 and H48 (C-NMC writes it both ways; one subject).
    assert by_name["UID_h3_6_1_hem"].subject == "H3" and by_name["UID_h3_6_1_hem"].label == 0
    assert {s.subject for s in samples} == {"1", "78", "H6", "H48", "H3"}
    assert {s.subject for s in samples if s.label == 0} == {"H6", "H48", "H3"}
    assert len({s.subject for s in samples}) == 5 and subject_warning(samples) is None


def test_h3_and_H3_are_one_subject_in_training_names_and_in_the_prelim_csv(tmp_path):
    root = tmp_path / "cnmc"
    shutil.copytree(CNMC_SAMPLE, root)
    lower = next(root.rglob("UID_h3_6_1_hem.png"))
    shutil.copy(lower, lower.with_name("UID_H3_7_1_hem.png"))
    samples, _ = collect_samples(root)
    assert sorted(s.path.name for s in samples if s.subject == "H3") == ["UID_H3_7_1_hem.png", "UID_h3_6_1_hem.png"]
    prelim = tmp_path / "prelim"
    prelim.mkdir()
    shutil.copy(lower, prelim / "1.png")
    (prelim / "labels.csv").write_text("Patient_ID,new_names,labels\nUID_h3_6_1_hem.bmp,1.png,0\n")
    (sample,) = collect_samples(prelim)[0]
    assert (sample.subject, sample.label) == ("H3", 0)


# -- the hash and its bound ---------------------------------------------------------------------------------------


def test_distinct_real_cells_are_far_apart_and_their_edited_copies_within_the_bound():
    images = {p.stem: decode_image(p) for p in sorted(CNMC_SAMPLE.rglob("*.png"))}
    hashes = {name: image_phash(rgb) for name, rgb in images.items()}
    assert all(h is not None and h.size * 8 == HASH_BITS for h in hashes.values())
    closest = min(hash_distance(hashes[a], hashes[b]) for a, b in itertools.combinations(hashes, 2))
    assert closest > 4 * MAX_DISTANCE, closest  # measured 72 bits
    edits = {
        "jpeg q50": lambda im: _jpeg(im, 50),
        "brightness +15 %": lambda im: _brighter(im, 1.15),
        "brightness -20 %": lambda im: _brighter(im, 0.8),
        "resized to 300 px": lambda im: _resized(im, 300),
        "resized to 224 px, jpeg q75": lambda im: _jpeg(_resized(im, 224), 75),
    }
    for name, rgb in images.items():
        for edit, f in edits.items():
            d = hash_distance(hashes[name], image_phash(f(rgb)))
            assert d <= MAX_DISTANCE, f"{name} {edit}: {d} bits"


def test_the_devices_dhash_keeps_the_nine_real_cells_apart():
    """The device hashes the cell's own box: hashing the whole crop on black, two different real cells were
    1 bit apart (mostly their outlines); on the cell's box they are at least twice the device's bound apart."""
    from device.store.duplicates import MAX_HAMMING, crop_dhash, hamming

    hashes = [crop_dhash(decode_image(p)) for p in sorted(CNMC_SAMPLE.rglob("*.png"))]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) >= 2 * MAX_HAMMING


def test_near_pairs_finds_every_close_pair_across_chunks_and_groups_are_transitive():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 256, (300, HASH_BITS // 8), dtype=np.uint8)

    def flipped(h, bits):
        out = np.unpackbits(h).copy()
        out[bits] ^= 1
        return np.packbits(out)

    hashes[250] = flipped(hashes[3], np.arange(MAX_DISTANCE))  # at the bound: found
    hashes[251] = flipped(hashes[4], np.arange(MAX_DISTANCE + 1))  # one bit more: not
    found = {tuple(p) for p in near_pairs(hashes, chunk=32).tolist()}
    bits = np.unpackbits(hashes, axis=1).astype(np.int32)
    dist = HASH_BITS - (bits @ bits.T + (1 - bits) @ (1 - bits).T)
    brute = {(i, j) for i, j in zip(*np.nonzero(dist <= MAX_DISTANCE), strict=True) if i < j}
    assert found == brute and (3, 250) in found and (4, 251) not in found
    # a ~ b and b ~ c, a and c further apart than the bound: still one group (union-find).
    a = hashes[10]
    b = flipped(a, np.arange(8))
    c = flipped(b, np.arange(8, 16))
    assert hash_distance(a, c) > MAX_DISTANCE
    groups = group_hashes([("x", a), ("y", b), ("z", c), ("w", hashes[11]), ("w", None)])
    assert groups == [0, 0, 0, 3, 3]  # the last: no pHash, the same bytes as the fourth


# -- splits and folds ---------------------------------------------------------------------------------------------


def _save(rgb: np.ndarray, path: Path) -> Path:
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Synthetic cells plus copies filed under other subjects: (root, {group: set of file names})."""
    from training.synth import write_cell_dataset

    root = tmp_path_factory.mktemp("dups") / "cells"
    write_cell_dataset(root, n_subjects=16, cells_per_subject=6, size=96, seed=0)
    samples, _ = collect_samples(root)
    by_subject: dict[str, list] = {}
    for s in samples:
        by_subject.setdefault(s.subject, []).append(s)
    blast = sorted(k for k in by_subject if not k.startswith("H"))
    healthy = sorted(k for k in by_subject if k.startswith("H"))
    assert len(blast) >= 4 and len(healthy) >= 4

    def src(subject):
        s = by_subject[subject][0]
        return s.path, decode_image(s.path)

    def dest(like: Path, subject: str, image: int, suffix: str) -> Path:
        label = like.stem.rsplit("_", 1)[1]
        return like.parent / f"UID_{subject}_{image}_1_{label}{suffix}"

    groups = {}
    # byte-identical copy, in another blast subject
    p, _ = src(blast[0])
    copy = dest(p, blast[1], 90, ".bmp")
    shutil.copy(p, copy)
    groups["exact"] = {p.name, copy.name}
    # brightened (PNG) and resized (BMP) copies of one healthy cell, in two other healthy subjects
    p, rgb = src(healthy[0])
    a = _save(_brighter(rgb, 1.1), dest(p, healthy[1], 91, ".png"))
    b = _save(_resized(rgb, 80), dest(p, healthy[2], 92, ".bmp"))
    groups["near"] = {p.name, a.name, b.name}
    # JPEG-re-encoded copy (stored as PNG) in another blast subject
    p, rgb = src(blast[2])
    c = _save(_jpeg(rgb, 75), dest(p, blast[3], 93, ".png"))
    groups["jpeg"] = {p.name, c.name}
    # a copy within the same subject: a group, but it joins nobody
    p, _ = src(healthy[3])
    same = dest(p, healthy[3], 94, ".bmp")
    shutil.copy(p, same)
    groups["same subject"] = {p.name, same.name}
    return root, groups


def _by_group(samples):
    groups: dict[str, set] = {}
    for s in samples:
        if s.dup_group:
            groups.setdefault(s.dup_group, set()).add(s.path.name)
    return groups


def _one_side(samples, names: list[str]) -> None:
    """Every duplicate group and every known subject is in exactly one of the split names."""
    where: dict[tuple, set] = {}
    for s, name in zip(samples, names, strict=True):
        if s.subject is not None:
            where.setdefault(("subject", s.subject), set()).add(name)
        if s.dup_group:
            where.setdefault(("dup", s.dup_group), set()).add(name)
    spans = {k: v for k, v in where.items() if len(v) > 1}
    assert not spans, f"split across parts: {spans}"


def _names(parts: dict) -> tuple[list, list]:
    return [s for p in parts.values() for s in p], [n for n, p in parts.items() for _ in p]


def test_copies_are_grouped_and_distinct_cells_are_not(planted):
    root, planted_groups = planted
    samples = mark_duplicates(read_dataset(root), progress=False)
    assert sorted(map(sorted, _by_group(samples).values())) == sorted(map(sorted, planted_groups.values()))
    summary = duplicate_summary(samples)
    assert (summary["groups"], summary["images"], summary["groups_across_subjects"]) == (4, 9, 3)
    # three cross-subject groups join 2 + 3 + 2 subjects into 3 units
    assert summary["subjects_joined"] == 7
    assert summary["split_units"] == len({s.subject for s in samples}) - 4
    report = inspect_dataset(root, progress=False)
    exact = [sorted(Path(p).name for p in g) for g in report["duplicates"]]
    near = [sorted(Path(p).name for p in g) for g in report["near_duplicates"]]
    assert sorted(exact) == sorted([sorted(planted_groups["exact"]), sorted(planted_groups["same subject"])])
    assert sorted(near) == sorted([sorted(planted_groups["near"]), sorted(planted_groups["jpeg"])])


def test_train_val_test_split_keeps_each_duplicate_group_on_one_side(planted):
    root, _ = planted
    samples = mark_duplicates(read_dataset(root), progress=False)
    unmarked = read_dataset(root)
    leaked = 0
    for seed in range(8):
        kept, names = _names(split_by_subject(samples, FRACTIONS, seed=seed))
        assert len(kept) == len(samples)
        assert set(names) == set(FRACTIONS)
        _one_side(kept, names)
        # Without the groups the same seeds do put copies on both sides: the test can fail.
        raw, raw_names = _names(split_by_subject(unmarked, FRACTIONS, seed=seed))
        part_of = {s.path.name: n for s, n in zip(raw, raw_names, strict=True)}
        leaked += any(len({part_of[f] for f in g}) > 1 for g in _by_group(samples).values())
    assert leaked > 0


def test_every_fold_keeps_each_duplicate_group_and_folds_csv_shows_the_groups(planted, tmp_path):
    root, planted_groups = planted
    samples = mark_duplicates(read_dataset(root), progress=False)
    for seed in range(5):
        splits = assign_folds(samples, k=3, test_fraction=0.3, seed=seed)
        assert set(splits) == {"test", "fold0", "fold1", "fold2"}
        _one_side(samples, splits)
    write_folds_csv(tmp_path / "folds.csv", samples, splits)
    rows = read_folds_csv(tmp_path / "folds.csv")
    assert list(rows[0]) == ["path", "subject", "label", "split", "dup_group"]
    shown: dict[str, set] = {}
    for r in rows:
        if r["dup_group"]:
            shown.setdefault(r["dup_group"], set()).add(Path(r["path"]).name)
    assert sorted(map(sorted, shown.values())) == sorted(map(sorted, planted_groups.values()))
    assert all(g.startswith("dup") for g in shown)
    for group in shown:
        assert len({r["split"] for r in rows if r["dup_group"] == group}) == 1, group
    assert sum(1 for r in rows if not r["dup_group"]) == len(rows) - 9  # singletons: empty


def test_without_duplicates_the_units_are_the_subjects(planted):
    root, _ = planted
    samples = [s for s in mark_duplicates(read_dataset(root), progress=False) if not s.dup_group]
    assert split_units(samples) == [s.subject for s in samples]  # so the split is the one made before


def test_without_subject_ids_the_duplicate_group_is_the_unit(planted, tmp_path):
    root, planted_groups = planted
    files = sorted(p for p in root.rglob("*") if p.suffix in (".bmp", ".png"))
    lines = ["path,label"] + [f"{p},{p.stem.rsplit('_', 1)[1]}" for p in files]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    samples = mark_duplicates(read_dataset(tmp_path / "manifest.csv"), progress=False)
    assert all(s.subject is None for s in samples)
    assert sorted(map(sorted, _by_group(samples).values())) == sorted(map(sorted, planted_groups.values()))
    units = split_units(samples)
    assert len(set(units)) == len(samples) - 9 + 4
    for seed in range(4):
        kept, names = _names(split_by_subject(samples, FRACTIONS, seed=seed))
        _one_side(kept, names)
        _one_side(samples, assign_folds(samples, k=3, test_fraction=0.3, seed=seed))


# -- through training (TensorFlow) --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.tf
def test_a_training_run_splits_by_duplicate_group_and_reports_it(tmp_path):
    pytest.importorskip("tensorflow")
    import json

    from training.synth import write_cell_dataset
    from training.train import TrainOptions, run_training

    data = tmp_path / "cells"
    write_cell_dataset(data, n_subjects=10, cells_per_subject=6, size=40, seed=1)
    samples, _ = collect_samples(data)
    blast = sorted({s.subject for s in samples if s.label == 1})
    first = next(s.path for s in samples if s.subject == blast[0])
    shutil.copy(first, first.with_name(f"UID_{blast[1]}_90_1_all.bmp"))
    _save(_brighter(decode_image(first), 1.1), first.with_name(f"UID_{blast[2]}_91_1_all.png"))
    opts = TrainOptions(input_size=32, epochs=1, batch_size=16, backbone="smallcnn", weights="none", seed=0)
    run_training(data, tmp_path / "run", opts, progress=False)
    with (tmp_path / "run" / "folds.csv").open() as f:
        rows = list(csv.DictReader(f))
    group = [r for r in rows if r["dup_group"]]
    assert len(group) == 3 and len({r["dup_group"] for r in group}) == 1
    assert len({r["split"] for r in group}) == 1
    info = json.loads((tmp_path / "run" / "training.json").read_text())
    dup = info["data"]["duplicates"]
    assert (dup["groups"], dup["images"], dup["groups_across_subjects"], dup["subjects_joined"]) == (1, 3, 1, 3)
    assert "Duplicates (same bytes (SHA-256) or pHash within" in (tmp_path / "run" / "report.md").read_text()
