"""The one module that imports a TFLite interpreter.

LiteRT (`ai-edge-litert`) first, then the legacy `tflite-runtime` (stopped at
2.14), then `tf.lite` from a full TensorFlow on a workstation. Nothing else in
the device imports an interpreter, so the rest of the code runs and is tested
the same whichever one is installed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from device.errors import BundleError

_CANDIDATES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)


def interpreter_class(prefer: str | None = None) -> tuple[type, str]:
    """Return (Interpreter class, runtime name), trying LiteRT first."""
    tried = []
    for name, module in _CANDIDATES:
        if prefer and name != prefer:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            tried.append(f"{module} ({exc})")
            continue
        return mod.Interpreter, name
    raise BundleError(
        "no TFLite runtime found (tried " + "; ".join(tried) + "). "
        "Install one: pip install ai-edge-litert (or the project's [device] extra)"
    )


def make_interpreter(model_path: str | Path, threads: int = 2, prefer: str | None = None):
    """Create and allocate an interpreter for a .tflite file. Build it once and reuse it."""
    cls, _ = interpreter_class(prefer)
    try:
        interp = cls(model_path=str(model_path), num_threads=threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"{model_path}: the runtime cannot load this model ({exc})") from None
    return interp


def runtime_name() -> str:
    """Name of the runtime that `make_interpreter` would use."""
    return interpreter_class()[1]
