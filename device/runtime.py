"""The one module that imports a TFLite interpreter.

LiteRT (`ai-edge-litert`) first, then the legacy `tflite-runtime` (stopped at
2.14), then `tf.lite` from a full TensorFlow on a workstation. Nothing else in
the device imports an interpreter, so the rest of the code runs and is tested
the same whichever one is installed.

The runtime's C++ code prints "INFO: Created TensorFlow Lite XNNPACK delegate
for CPU." on stderr whenever an interpreter is made, and no option of the
Python API turns that one line off without turning XNNPACK itself off (slower
on the Pi). `make_interpreter` therefore holds stderr while it builds and
writes back everything the runtime printed except that one known line, so
warnings and errors still show.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from device.errors import BundleError

log = logging.getLogger(__name__)

NATIVE_NOTICES = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)
"""Lines the runtime prints on stderr while building an interpreter that say nothing to act on; dropped."""
_STDERR_LOCK = threading.Lock()

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
        with without_native_notices():  # the XNNPACK delegate is applied, and announced, in allocate_tensors
            interp = cls(model_path=str(model_path), num_threads=threads)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"{model_path}: the runtime cannot load this model ({exc})") from None
    return interp


@contextlib.contextmanager
def without_native_notices(drop: tuple[bytes, ...] = NATIVE_NOTICES):
    """Hold what is written to file descriptor 2 inside the block; then write it back without the `drop` lines.

    Only for short blocks (building an interpreter): anything another thread writes to stderr meanwhile is
    delayed until the block ends, never lost. Where fd 2 cannot be redirected, nothing is filtered.
    """
    with _STDERR_LOCK:
        _flush_stderr()
        try:
            held = tempfile.TemporaryFile()
            saved = os.dup(2)
        except OSError:  # no fd 2 (a daemon started without one), or no temp space: no filtering
            saved = None
        if saved is None:
            yield
            return
        with held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                lines = held.read().splitlines(keepends=True)
                kept = b"".join(line for line in lines if line.rstrip(b"\r\n") not in drop)
                if len(kept) != sum(map(len, lines)):
                    log.debug("runtime: XNNPACK delegate created (its notice is not printed)")
                _write_all(2, kept)


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):  # a replaced or closed sys.stderr
        sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]


def runtime_name() -> str:
    """Name of the runtime that `make_interpreter` would use."""
    return interpreter_class()[1]
