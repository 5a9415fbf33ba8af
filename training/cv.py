"""Subject-grouped k-fold cross-validation with a grouped held-out test split.

`assign_folds` (StratifiedGroupKFold) puts every subject in exactly one of
"test", "fold0".."fold{k-1}", together with every subject that shares a
duplicate image with it (`mark_duplicates`); `folds.csv` records both per image. Fold i trains
on the other folds and validates on fold i (early stopping, threshold and
temperature use it, so its scores are slightly optimistic); every fold is also
scored on the same held-out test split, which no fold ever sees.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.datasets import assign_folds, duplicate_summary, mark_duplicates, read_dataset, write_folds_csv

SUMMARY_KEYS = ("accuracy", "sensitivity", "specificity", "f1_weighted", "auc")


def _value(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return v.get("value") if isinstance(v, dict) else v


def mean_sd(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(vals)) if vals else None,
        "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
        "n": len(vals),
    }


def run_cv(data_dir: str | Path, out_dir: str | Path, opts, k: int = 5, progress: bool = True) -> dict:
    """Train k fold models; write folds.csv, fold*/ run folders and cv.json; return the summary."""
    from training.train import run_training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = mark_duplicates(read_dataset(data_dir), progress)
    splits = assign_folds(samples, k, opts.test_fraction, opts.seed)
    write_folds_csv(out / "folds.csv", samples, splits)
    test = [s for s, name in zip(samples, splits, strict=True) if name == "test"]
    per_fold = []
    for i in tqdm(range(k), desc="cross-validation folds", unit="fold", disable=not progress):
        val = [s for s, name in zip(samples, splits, strict=True) if name == f"fold{i}"]
        train = [s for s, name in zip(samples, splits, strict=True) if name not in ("test", f"fold{i}")]
        fold_opts = dataclasses.replace(opts, report=False, seed=opts.seed + i)
        m = run_training(
            data_dir, out / f"fold{i}", fold_opts, progress=progress, parts={"train": train, "val": val, "test": test}
        )
        per_fold.append(
            {
                "fold": i,
                "val": {key: _value(m["val"], key) for key in SUMMARY_KEYS},
                "test": {key: _value(m["test"], key) for key in SUMMARY_KEYS},
                "threshold": m["operating_point"]["threshold"],
            }
        )
    summary = {
        "synthetic_data": any(Path(data_dir).rglob("SYNTHETIC_README.txt")) if Path(data_dir).is_dir() else False,
        "folds": k,
        "subjects_per_split": {
            name: len({s.subject or str(s.path) for s, n in zip(samples, splits, strict=True) if n == name})
            for name in sorted(set(splits))
        },
        "duplicates": duplicate_summary(samples),
        "per_fold": per_fold,
        # Only the held-out test rows are evidence. Each fold's threshold is chosen on its own validation
        # fold (for the target sensitivity), so validation sensitivity is fixed by construction: tuning data.
        "mean_sd": {f"test {key}": mean_sd([f["test"][key] for f in per_fold]) for key in SUMMARY_KEYS},
        "tuning_val_mean_sd": {f"val {key}": mean_sd([f["val"][key] for f in per_fold]) for key in SUMMARY_KEYS},
        "note": "mean_sd is over the folds' held-out test results; tuning_val_mean_sd is the validation folds "
        "the thresholds were chosen on (their sensitivity is set by construction, not measured)",
    }
    (out / "cv.json").write_text(json.dumps(summary, indent=2))
    return summary
