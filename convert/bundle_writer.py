"""Write a model bundle atomically: a temp folder beside the target, then a rename.

A failed or interrupted convert never leaves half a bundle where the device
looks; the previous bundle at that path is kept as `<name>.previous` until the
new one is in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from device.bundle import GOLDEN_FILE, META_FILE, MODEL_FILE, SCHEMA_VERSION
from device.imaging import fsync_dir


def write_bundle(out_dir: str | Path, tflite: bytes, meta: dict, golden: dict[str, np.ndarray], tolerance: float) -> Path:
    """Write model.tflite, golden.npz and model.json (with hashes) into out_dir atomically."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / MODEL_FILE).write_bytes(tflite)
        buf = io.BytesIO()
        np.savez_compressed(buf, crops=golden["crops"], probabilities=golden["probabilities"].astype(np.float32),
                            cams=golden["cams"].astype(np.float32))
        (tmp / GOLDEN_FILE).write_bytes(buf.getvalue())
        full = {
            **meta,
            "schema_version": SCHEMA_VERSION,
            "tflite_sha256": sha256_bytes(tflite),
            "tflite_bytes": len(tflite),
            "created": meta.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
            "golden": {"file": GOLDEN_FILE, "count": int(len(golden["crops"])), "tolerance": tolerance,
                       "sha256": sha256_bytes(buf.getvalue())},
        }
        (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
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
