"""Write a model bundle atomically: a temp folder beside the target, then a rename.

A failed or interrupted convert never leaves half a bundle where the device
looks; the previous bundle at that path is kept as `<name>.previous` until the
new one is in place. model.json is checked with the device's own
`BundleMeta.from_dict` before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from device.bundle import GOLDEN_FILE, META_FILE, MODEL_FILE, SCHEMA_VERSION, BundleMeta
from device.imaging import fsync_dir


def write_bundle(
    out_dir: str | Path,
    tflite: bytes,
    meta: BundleMeta | Mapping[str, Any],
    golden: dict[str, np.ndarray],
    tolerance: float,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write model.tflite, golden.npz and model.json (with hashes) into out_dir atomically.

    `meta` is a BundleMeta (or its dict) without the fields this function fills in: schema_version,
    tflite_sha256, tflite_bytes, golden and, unless given, created. `extra_files` ({name: text}) are written
    beside them, e.g. the convert report; the device neither reads nor checks them.

    Raises:
        BundleError: the resulting model.json would not load on the device; nothing is written.
    """
    out = Path(out_dir).resolve()
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        crops=golden["crops"],
        probabilities=golden["probabilities"].astype(np.float32),
        cams=golden["cams"].astype(np.float32),
    )
    full = meta.to_dict() if isinstance(meta, BundleMeta) else dict(meta)
    full.update(
        {
            "schema_version": SCHEMA_VERSION,
            "tflite_sha256": sha256_bytes(tflite),
            "tflite_bytes": len(tflite),
            "created": full.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
            "golden": {
                "file": GOLDEN_FILE,
                "count": int(len(golden["crops"])),
                "tolerance": tolerance,
                "sha256": sha256_bytes(buf.getvalue()),
            },
        }
    )
    checked = BundleMeta.from_dict(full, out / META_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / MODEL_FILE).write_bytes(tflite)
        (tmp / GOLDEN_FILE).write_bytes(buf.getvalue())
        (tmp / META_FILE).write_text(json.dumps(checked.to_dict(), indent=2, sort_keys=True))
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in (MODEL_FILE, GOLDEN_FILE, META_FILE):
                raise ValueError(f"extra bundle file {name!r}: a plain file name other than the bundle's own")
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp makes it private; the device's service user must read it
        previous = out.with_name(out.name + ".previous")
        if out.exists():
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(out, previous)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if previous.exists():
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
