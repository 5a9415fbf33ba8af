"""The model bundle: the contract between `convert` and the device.

A bundle is a folder holding `model.tflite`, `model.json` and `golden.npz`.
`load_bundle` checks model.json field by field (`device.bundle_meta.BundleMeta`),
the sha256 of the tflite file and the golden file before anything runs; the
classifier then checks tensor shapes against model.json. Any mismatch is a
BundleError that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.bundle_meta import REQUIRED_KEYS, SCHEMA_VERSION, BundleMeta
from device.errors import BundleError
from device.preprocess import PreprocessContract

MODEL_FILE = "model.tflite"
META_FILE = "model.json"
GOLDEN_FILE = "golden.npz"
__all__ = [
    "GOLDEN_FILE",
    "META_FILE",
    "MODEL_FILE",
    "REQUIRED_KEYS",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleMeta",
    "Golden",
    "load_bundle",
    "sha256_file",
]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Golden:
    """Crops with the outputs the converter measured, for the start-up self-test."""

    crops: np.ndarray
    probabilities: np.ndarray
    cams: np.ndarray
    tolerance: float


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict
    """model.json as read. New code reads `info`, the same fields typed and checked."""
    contract: PreprocessContract
    golden: Golden
    info: BundleMeta
    """model.json, typed (device.bundle_meta)."""

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def sha256(self) -> str:
        return self.info.tflite_sha256

    @property
    def labels(self) -> tuple[str, str]:
        """(negative label, positive label)."""
        return self.info.labels

    @property
    def threshold(self) -> float:
        return float(self.info.threshold)

    @property
    def review_band(self) -> tuple[float, float]:
        low, high = self.info.review_band
        return float(low), float(high)

    @property
    def synthetic(self) -> bool:
        return self.info.synthetic


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle folder.

    Raises:
        BundleError: a missing file, a schema this device does not read, a
            tflite file whose sha256 differs from model.json, or bad fields.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"{path}: model bundle folder not found; set [model] bundle to a folder written by `leukocam convert`"
        )
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(
            f"{path}: no {META_FILE}; this is not a LeukoCam bundle (re-run `leukocam convert`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable or not JSON ({exc}); re-run `leukocam convert`") from None
    info = BundleMeta.from_dict(meta, meta_path)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise BundleError(f"{path}: no {MODEL_FILE}; the bundle is incomplete, copy it again")
    actual = sha256_file(model_path)
    if actual != info.tflite_sha256:
        raise BundleError(
            f"{model_path}: sha256 {actual[:12]}… does not match model.json ({info.tflite_sha256[:12]}…); "
            "the model file was changed or damaged after conversion. Copy the bundle again; do not edit it"
        )
    golden = _load_golden(path, info)
    return Bundle(path=path, meta=meta, contract=info.contract, golden=golden, info=info)


# What a damaged .npz raises on opening or reading a member (a truncated zip, a bad CRC, a broken .npy header).
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def _load_golden(path: Path, info: BundleMeta) -> Golden:
    gpath = path / GOLDEN_FILE
    if not gpath.is_file():
        raise BundleError(f"{path}: no {GOLDEN_FILE} (golden crops for the self-test); re-run `leukocam convert`")
    expected = info.golden.sha256
    if expected and sha256_file(gpath) != expected:
        raise BundleError(f"{gpath}: sha256 does not match model.json; the bundle was altered. Copy it again")
    if not zipfile.is_zipfile(gpath):  # np.load would read a bare .npy (or a pickle) as something else
        raise BundleError(f"{gpath}: not a .npz archive (damaged or replaced); re-run `leukocam convert`")
    try:
        with np.load(gpath, allow_pickle=False) as npz:
            crops, probs, cams = npz["crops"], npz["probabilities"], npz["cams"]
    except _NPZ_ERRORS as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{gpath}: unreadable golden file ({why}); re-run `leukocam convert`") from None
    size = info.input_size
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise BundleError(
            f"{gpath}: golden crops have shape {crops.shape} {crops.dtype}, expected N x {size} x {size} x 3 uint8"
        )
    if probs.shape != (len(crops),) or probs.dtype.kind != "f" or not np.all(np.isfinite(probs)):
        raise BundleError(
            f"{gpath}: golden probabilities have shape {probs.shape} {probs.dtype}, "
            f"expected {len(crops)} finite floats (one per crop); re-run `leukocam convert`"
        )
    return Golden(crops=crops, probabilities=probs, cams=cams, tolerance=float(info.golden.tolerance))
