"""Dataset readers, `data inspect`, subject-grouped folds and the CLI's bad-input messages (no TensorFlow needed)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from training.datasets import (
    DatasetError,
    assign_folds,
    collect_samples,
    inspect_dataset,
    read_dataset,
    read_folds_csv,
    subject_warning,
    write_folds_csv,
)


def _img(path, seed=0, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _cnmc(root, subjects=("1", "2", "3", "H1", "H2", "H3"), cells=3):
    for i, sub in enumerate(subjects):
        label = "hem" if sub.startswith("H") else "all"
        for c in range(cells):
            _img(root / "training_data" / f"fold_{i % 3}" / label / f"UID_{sub}_{c}_1_{label}.bmp", seed=i * 10 + c)
    return root


def test_cnmc_training_names_give_label_and_subject(tmp_path):
    samples = read_dataset(_cnmc(tmp_path / "cnmc"))
    assert len(samples) == 18
    assert {s.subject for s in samples if s.label == 1} == {"1", "2", "3"}
    assert {s.subject for s in samples if s.label == 0} == {"H1", "H2", "H3"}
    assert subject_warning(samples) is None


def test_cnmc_preliminary_test_folder_reads_labels_csv(tmp_path):
    root = tmp_path / "prelim"
    for i in range(1, 5):
        _img(root / "C-NMC_test_prelim_phase_data" / f"{i}.bmp", seed=i)
    with (root / "C-NMC_test_prelim_phase_data_labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Patient_ID", "new_names", "labels"])
        w.writerow(["UID_57_29_1_all.bmp", "1.bmp", 1])
        w.writerow(["UID_57_22_2_all.bmp", "2.bmp", 1])
        w.writerow(["UID_H49_35_1_hem.bmp", "3.bmp", 0])
        w.writerow(["UID_H10_2_1_hem.bmp", "4.bmp", 0])
    by_name = {s.path.name: s for s in read_dataset(root)}
    assert (by_name["1.bmp"].label, by_name["1.bmp"].subject) == (1, "57")
    assert (by_name["3.bmp"].label, by_name["3.bmp"].subject) == (0, "H49")
    assert by_name["2.bmp"].subject == by_name["1.bmp"].subject


def test_all_idb2_suffix_is_the_label_and_no_subjects_warns(tmp_path):
    root = tmp_path / "ALL_IDB2" / "img"
    for i, lab in enumerate([1, 1, 0, 0, 0], start=1):
        _img(root / f"Im{i:03d}_{lab}.tif", seed=i)
    samples = read_dataset(tmp_path / "ALL_IDB2")
    assert sorted(s.label for s in samples) == [0, 0, 0, 1, 1]
    assert all(s.subject is None for s in samples)
    assert "split by IMAGE" in subject_warning(samples)


def test_csv_manifest_relative_paths_labels_and_subjects(tmp_path):
    _img(tmp_path / "imgs" / "a.png", 1)
    _img(tmp_path / "imgs" / "b.png", 2)
    _img(tmp_path / "imgs" / "c.png", 3)
    (tmp_path / "manifest.csv").write_text(
        "path,label,subject\nimgs/a.png,blast,p1\nimgs/b.png,normal,p2\nimgs/c.png,0,\n"
    )
    samples = read_dataset(tmp_path / "manifest.csv")
    assert [(s.path.name, s.label, s.subject) for s in samples] == [
        ("a.png", 1, "p1"),
        ("b.png", 0, "p2"),
        ("c.png", 0, None),
    ]
    assert samples[0].path == tmp_path / "imgs" / "a.png"
    (tmp_path / "bad.csv").write_text("path,label\nimgs/a.png,maybe\n")
    with pytest.raises(DatasetError, match="maybe"):
        read_dataset(tmp_path / "bad.csv")


def test_bad_inputs_raise_clear_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        read_dataset(tmp_path / "empty")
    _img(tmp_path / "one" / "all" / "x.png")
    with pytest.raises(DatasetError, match="every image is 'blast'"):
        read_dataset(tmp_path / "one")


def test_inspect_counts_duplicates_and_unreadable_without_crashing(tmp_path):
    root = _cnmc(tmp_path / "cnmc")
    src = next(root.rglob("UID_1_0_1_all.bmp"))
    shutil.copy(src, src.parent / "UID_1_9_1_all.bmp")  # exact duplicate
    (src.parent / "UID_2_9_1_all.bmp").write_bytes(b"not an image")
    _img(root / "training_data" / "fold_0" / "hem" / "UID_H1_8_1_hem.bmp", seed=99, size=(30, 30))
    report = inspect_dataset(root, progress=False)
    assert report["images"] == 21
    assert report["per_class"] == {"blast": 11, "normal": 10}
    assert report["per_subject"]["1"] == 4 and report["subjects"] == 6
    assert len(report["unreadable"]) == 1 and "UID_2_9_1_all.bmp" in report["unreadable"][0]
    assert [sorted(p.rsplit("/", 1)[1] for p in g) for g in report["duplicates"]] == [
        ["UID_1_0_1_all.bmp", "UID_1_9_1_all.bmp"]
    ]
    assert report["sizes"] == {"24x20": 19, "30x30": 1}
    assert any("different image sizes" in p for p in report["problems"])


def test_folds_and_test_split_never_share_a_subject(tmp_path):
    subjects = [str(i) for i in range(1, 9)] + [f"H{i}" for i in range(1, 9)]
    samples, _ = collect_samples(_cnmc(tmp_path / "cnmc", subjects=subjects, cells=2))
    splits = assign_folds(samples, k=3, test_fraction=0.3, seed=0)
    write_folds_csv(tmp_path / "folds.csv", samples, splits)
    rows = read_folds_csv(tmp_path / "folds.csv")
    assert len(rows) == len(samples) and {r["split"] for r in rows} == {"test", "fold0", "fold1", "fold2"}
    where: dict[str, set] = {}
    for r in rows:
        where.setdefault(r["subject"], set()).add(r["split"])
    assert all(len(parts) == 1 for parts in where.values()), "a subject is in two splits"
    for part in ("test", "fold0", "fold1", "fold2"):
        assert {r["label"] for r in rows if r["split"] == part} == {"blast", "normal"}
    with pytest.raises(DatasetError, match="too few"):
        assign_folds(samples[:4], k=5)


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path):
    from training.cli import data, train

    runner = CliRunner()
    result = runner.invoke(data, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "dataset folder not found" in result.output
    assert "Traceback" not in result.output
    _img(tmp_path / "one" / "hem" / "x.png")
    result = runner.invoke(train, [str(tmp_path / "one"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "every image is 'normal'" in result.output
    assert "Traceback" not in result.output


def test_cli_inspect_prints_summary_and_warnings(tmp_path):
    from training.cli import data

    root = tmp_path / "idb"
    for i, lab in enumerate([1, 0, 1], start=1):
        _img(root / f"Im{i:03d}_{lab}.tif", seed=i)
    result = CliRunner().invoke(data, ["inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert "3 labelled images" in result.output and "split by IMAGE" in result.output


# -- zips and the export's manifest (issue #13) -------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LEUKOCAM_CACHE", str(folder))
    return folder


def _zip_folder(folder, zip_path, prefix=""):
    import zipfile

    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return zip_path


def test_a_zip_reads_as_the_folder_it_unpacks_to(tmp_path, cache):
    root = _cnmc(tmp_path / "cnmc")
    (root / "training_data" / "fold_0" / "all" / "UID_1_9_1_all.bmp").write_bytes(b"not an image")
    zipped = _zip_folder(root, tmp_path / "cnmc.zip", prefix="cnmc/")
    from_folder, from_zip = read_dataset(root), read_dataset(zipped)
    key = [(s.path.name, s.label, s.subject) for s in from_folder]
    assert sorted(key) == sorted((s.path.name, s.label, s.subject) for s in from_zip)
    assert all(s.path.is_relative_to(cache) and s.path.is_file() for s in from_zip)
    again = read_dataset(zipped)  # unpacked once: the same paths, so folds.csv stays valid for evaluate
    assert [s.path for s in again] == [s.path for s in from_zip]
    report = inspect_dataset(zipped, progress=False)
    assert report["images"] == len(from_folder) and report["root"] == str(zipped)
    assert report["unreadable"][0].startswith(f"{zipped}/cnmc/training_data/fold_0/all/UID_1_9_1_all.bmp: ")
    assert "uploaded image" not in report["unreadable"][0]
    assert report["unpacked_to"] and str(cache) in report["unpacked_to"]


def test_a_changed_zip_unpacks_afresh(tmp_path, cache):
    import os

    root = _cnmc(tmp_path / "cnmc", subjects=("1", "H1"), cells=2)
    zipped = _zip_folder(root, tmp_path / "d.zip")
    assert len(read_dataset(zipped)) == 4
    _img(root / "training_data" / "fold_0" / "all" / "UID_1_7_1_all.bmp", seed=7)
    _zip_folder(root, zipped)
    os.utime(zipped, ns=(1, 2_000_000_000_000_000_000))
    assert len(read_dataset(zipped)) == 5


def test_bad_zips_are_one_clear_error(tmp_path, cache):
    import zipfile

    fake = tmp_path / "export.zip"
    fake.write_bytes(b"PK but not really a zip")
    with pytest.raises(DatasetError, match=r"export\.zip: not a readable zip file"):
        read_dataset(fake)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("all/UID_1_1_1_all.bmp", b"x")
        zf.writestr("../../outside.bmp", b"x")
    with pytest.raises(DatasetError, match="would unpack outside its folder"):
        read_dataset(evil)
    assert not (tmp_path / "outside.bmp").exists() and not list(cache.rglob("*.bmp"))
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(DatasetError, match=r"empty\.zip: no images"):
        read_dataset(empty)


def test_manifest_accepts_the_old_export_column_name(tmp_path):
    _img(tmp_path / "cells" / "all" / "a.bmp", 1)
    _img(tmp_path / "cells" / "hem" / "b.bmp", 2)
    header = "file,label,subject,slide_id,capture_id,cell_id,model_label,probability\n"
    (tmp_path / "manifest.csv").write_text(
        header + "cells/all/a.bmp,blast,1,S1,1,1,normal,0.2\ncells/hem/b.bmp,normal,2,S2,2,2,normal,0.1\n"
    )
    samples = read_dataset(tmp_path / "manifest.csv")
    assert [(s.path, s.label, s.subject) for s in samples] == [
        (tmp_path / "cells" / "all" / "a.bmp", 1, "1"),
        (tmp_path / "cells" / "hem" / "b.bmp", 0, "2"),
    ]
    (tmp_path / "nopath.csv").write_text("image,label\ncells/all/a.bmp,blast\n")
    with pytest.raises(DatasetError, match="columns path,label"):
        read_dataset(tmp_path / "nopath.csv")
