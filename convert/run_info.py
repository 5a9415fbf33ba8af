"""What `leukocam train` hands to `convert`: the run folder's training.json and metrics.json, typed.

`read_run_info(model_path)` reads the files beside the .keras model and checks
the fields convert uses; a run folder it cannot use is a ConvertError that
names the file and the field. Importable without TensorFlow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ConvertError
from device.preprocess import PreprocessContract

TRAINING_FILE = "training.json"
METRICS_FILE = "metrics.json"
SPLITS = ("train", "val", "test")
_REDO = "re-run `leukocam train`, or pass the model inside the run folder it wrote"


@dataclass(frozen=True)
class SplitFiles:
    """The image files of each split, as training recorded them (paths in the training dataset)."""

    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()

    def of(self, split: str) -> tuple[str, ...]:
        """The files of "train", "val" or "test"."""
        return getattr(self, split)


@dataclass(frozen=True)
class RunInfo:
    """A training run as convert reads it (training.json, and metrics.json when present)."""

    model_path: Path
    """The .keras model; training.json and metrics.json lie beside it."""
    labels: tuple[str, str]
    """(negative, positive)."""
    contract: PreprocessContract
    threshold: float
    review_band: tuple[float, float]
    data: Mapping[str, Any]
    """The dataset summary (copied into the bundle's `training`)."""
    options: Mapping[str, Any]
    """The training options (copied into the bundle's `training`)."""
    split_files: SplitFiles = field(default_factory=SplitFiles)
    data_um_per_px: float | None = None
    """Pixel size of the training images; None when training did not know it."""
    feature_layer: str = ""
    """The backbone layer the CAM is taken from."""
    synthetic: bool = False
    """metrics.json `synthetic_data`: the model was trained on SYNTHETIC data."""
    test_metrics: Mapping[str, Any] | None = None
    """metrics.json `test`: the float model on the test split, as training measured it."""

    @property
    def run_dir(self) -> Path:
        return self.model_path.parent

    @classmethod
    def from_dicts(
        cls, model_path: str | Path, training: Any, metrics: Any = None, source: str | Path = TRAINING_FILE
    ) -> RunInfo:
        """Check parsed training.json (and metrics.json, or None) and return them typed.

        Raises:
            ConvertError: a missing field or one of the wrong type; the message names it.
        """
        t = _Reader(training, str(source))
        t.require("labels", "preprocess", "threshold", "review_band", "data", "options")
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, Mapping):
            raise ConvertError(f"{Path(model_path).parent / METRICS_FILE}: expected a JSON object; {_REDO}")
        return cls(
            model_path=Path(model_path),
            labels=t.labels(),
            contract=t.contract(),
            threshold=float(t.number("threshold")),
            review_band=t.band(),
            data=t.mapping("data"),
            options=t.mapping("options"),
            split_files=t.splits(),
            data_um_per_px=t.pixel_size(),
            feature_layer=t.text("feature_layer", ""),
            synthetic=bool(metrics.get("synthetic_data", False)),
            test_metrics=metrics.get("test"),
        )


def read_run_info(model_path: str | Path) -> RunInfo:
    """Read training.json and metrics.json beside MODEL_PATH (the run folder `leukocam train` wrote).

    Raises:
        ConvertError: no training.json, a file that is not JSON, or a field convert cannot use.
    """
    model_path = Path(model_path)
    info_path = model_path.parent / TRAINING_FILE
    if not info_path.is_file():
        raise ConvertError(f"{info_path} not found: convert needs the run folder written by `leukocam train`")
    metrics_path = model_path.parent / METRICS_FILE
    training = _read_json(info_path)
    metrics = _read_json(metrics_path) if metrics_path.is_file() else None
    return RunInfo.from_dicts(model_path, training, metrics, source=info_path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path}: unreadable or not JSON ({exc}); {_REDO}") from None


class _Reader:
    """Typed reads of training.json; each failure is a ConvertError naming the field."""

    def __init__(self, data: Any, source: str):
        if not isinstance(data, Mapping):
            raise ConvertError(f"{source}: expected a JSON object; {_REDO}")
        self.data, self.source = data, source

    def fail(self, key: str, problem: str) -> ConvertError:
        return ConvertError(f"{self.source}: {key} {problem}; {_REDO}")

    def require(self, *keys: str) -> None:
        missing = [k for k in keys if k not in self.data]
        if missing:
            raise ConvertError(f"{self.source}: missing fields {', '.join(missing)}; {_REDO}")

    def labels(self) -> tuple[str, str]:
        labels = self.data["labels"]
        if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, str) for x in labels)):
            raise self.fail("labels", f"must be [negative, positive], got {labels!r}")
        return labels[0], labels[1]

    def contract(self) -> PreprocessContract:
        try:
            return PreprocessContract.from_dict(dict(self.data["preprocess"]))
        except (TypeError, ValueError) as exc:
            raise self.fail("preprocess", f"is not a preprocess contract ({exc})") from None

    def number(self, key: str) -> float:
        value = self.data[key]
        if not _is_number(value):
            raise self.fail(key, f"must be a number, got {value!r}")
        return value

    def band(self) -> tuple[float, float]:
        band = self.data["review_band"]
        if not (isinstance(band, list) and len(band) == 2 and all(_is_number(v) for v in band)):
            raise self.fail("review_band", f"must be [low, high], got {band!r}")
        return band[0], band[1]

    def mapping(self, key: str) -> Mapping[str, Any]:
        if not isinstance(self.data[key], Mapping):
            raise self.fail(key, "must be a JSON object")
        return self.data[key]

    def text(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {value!r}")
        return value

    def pixel_size(self) -> float | None:
        um = self.data.get("data_um_per_px")
        if um is not None and not (_is_number(um) and um > 0):
            raise self.fail("data_um_per_px", f"must be a positive number or null, got {um!r}")
        return um

    def splits(self) -> SplitFiles:
        raw = self.data.get("split_files")
        if raw is None:
            return SplitFiles()
        if not isinstance(raw, Mapping):
            raise self.fail("split_files", "must map split names to lists of files")
        out = {}
        for name in SPLITS:
            files = raw.get(name, [])
            if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
                raise self.fail(f"split_files.{name}", "must be a list of file paths")
            out[name] = tuple(files)
        return SplitFiles(**out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
