"""Per-cell classification and CAM with a LiteRT interpreter, built once.

The model takes uint8 RGB crops and returns, by signature name, the blast
probability, the pre-activation logit and the class activation map
CAM = sum_k w_k A_k of the last feature map. For a global-average-pooling +
Dense head this is exactly Grad-CAM up to a positive scale (docs/design.md), so the
device needs no gradients: the heatmap of the positive class is ReLU(CAM), of
the negative class ReLU(-CAM). The dashboard draws the signed CAM itself, on the
fixed scale `Classifier.cam_scale` (device/heatmap.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from device import runtime
from device.bundle import Bundle
from device.errors import BundleError
from device.heatmap import fixed_cam_scale

OUTPUT_NAMES = ("probability", "logit", "cam")


@dataclass(frozen=True)
class CellPrediction:
    probability: float
    """Probability of the positive class (blast), 0-1."""
    label: str
    """Predicted label: bundle labels[1] when probability >= threshold, else labels[0]."""
    needs_review: bool
    """True when the probability lies inside the bundle's review band: a person should look."""
    logit: float
    """Pre-activation logit of the positive class."""
    cam: np.ndarray
    """Signed class activation map (float32 h x w); positive = evidence for the positive class."""

    positive: bool = False
    """True when the predicted label is the positive class."""

    def heatmap(self) -> np.ndarray:
        """CAM of the predicted class, ReLU'd and scaled to 0-1 (float32 h x w): sign and scale are lost, so
        the dashboard draws `cam` instead (device.heatmap.evidence_overlay); this is for comparing maps."""
        return class_heatmap(self.cam, positive=self.positive)


def class_heatmap(cam: np.ndarray, positive: bool) -> np.ndarray:
    """ReLU of the signed CAM for one class, scaled to 0-1 by its maximum."""
    m = np.maximum(cam if positive else -cam, 0.0).astype(np.float32)
    peak = float(m.max()) if m.size else 0.0
    return m / peak if peak > 0 else m


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    max_abs_diff: float
    tolerance: float
    count: int
    seconds: float
    message: str


class Classifier:
    """A LiteRT session over one bundle. Use as a context manager; classify batches of crops."""

    def __init__(self, bundle: Bundle, threads: int = 2, prefer_runtime: str | None = None):
        self.bundle = bundle
        self.runtime = runtime.interpreter_class(prefer_runtime)[1]
        self._interp = runtime.make_interpreter(bundle.model_path, threads=threads, prefer=prefer_runtime)
        signature = bundle.info.signature
        try:
            self._runner = self._interp.get_signature_runner(signature)
        except ValueError:
            raise BundleError(
                f"{bundle.path}: the model has no signature {signature!r}; re-run `leukocam convert`"
            ) from None
        self._input_name, in_detail = self._single_input()
        self._in_scale, self._in_zero = _quant(in_detail)
        self._in_dtype = in_detail["dtype"]
        out = self._runner.get_output_details()
        self._out_names = bundle.info.outputs.by_role()
        for role in OUTPUT_NAMES:
            name = self._out_names.get(role)
            if name not in out:
                raise BundleError(
                    f"{bundle.path}: model output {name!r} for {role!r} not found (outputs: {sorted(out)})"
                )
        self._out_quant = {name: _quant(d) for name, d in out.items()}
        size = bundle.info.input_size
        shape = tuple(int(v) for v in in_detail["shape"][1:])
        if shape != (size, size, 3):
            raise BundleError(f"{bundle.path}: model input is {shape}, but model.json says {size}x{size}x3")
        cam_shape = tuple(int(v) for v in out[self._out_names["cam"]]["shape"][1:3])
        expected_cam = bundle.info.cam.shape
        if cam_shape != expected_cam:
            raise BundleError(f"{bundle.path}: CAM output is {cam_shape}, but model.json says {expected_cam}")
        self.cam_scale = self._cam_scale()
        """|CAM| at which heatmaps reach full colour: fixed per bundle, the same for every cell (device/heatmap.py)."""

    def _cam_scale(self) -> float:
        """The 99th percentile of |CAM| over the golden crops: as recorded by the converter (the bundle's own
        outputs), else (a bundle whose golden CAMs are blank) as this runtime computes them; 1.0 if neither."""
        g = self.bundle.golden
        scale = fixed_cam_scale(g.cams) if g.cams is not None and np.size(g.cams) else None
        if scale is None and len(g.crops):
            scale = fixed_cam_scale(self.raw(g.crops)["cam"])
        return scale if scale is not None else 1.0

    def _single_input(self) -> tuple[str, dict]:
        details = self._runner.get_input_details()
        if len(details) != 1:
            raise BundleError(f"{self.bundle.path}: expected one model input, found {sorted(details)}")
        name, detail = next(iter(details.items()))
        return name, detail

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._runner = None
        self._interp = None

    @property
    def input_dtype(self) -> str:
        """The model's input type: "uint8" for full-integer bundles, "float32" otherwise."""
        return np.dtype(self._in_dtype).name

    @property
    def input_size(self) -> int:
        return self.bundle.info.input_size

    def raw(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on uint8 crops N x S x S x 3; return float outputs by role."""
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"crops: expected uint8 N x {self.input_size} x {self.input_size} x 3, got {crops.dtype} {crops.shape}"
            )
        x = self._quantize_input(crops)
        result = self._runner(**{self._input_name: x})
        out = {}
        for role in OUTPUT_NAMES:
            name = self._out_names[role]
            scale, zero = self._out_quant[name]
            value = result[name].astype(np.float32)
            if scale:
                value = (value - zero) * scale
            out[role] = value
        out["probability"] = out["probability"].reshape(len(crops))
        out["logit"] = out["logit"].reshape(len(crops))
        out["cam"] = out["cam"].reshape(len(crops), *out["cam"].shape[1:3])
        return out

    def _quantize_input(self, crops: np.ndarray) -> np.ndarray:
        # Each tensor carries its own (scale, zero_point); pixels are 0-255 floats in the Keras graph.
        if self._in_dtype == np.float32:
            return crops.astype(np.float32)
        if self._in_scale and (abs(self._in_scale - 1.0) > 1e-6 or self._in_zero != 0):
            info = np.iinfo(self._in_dtype)
            q = np.round(crops.astype(np.float32) / self._in_scale + self._in_zero)
            return np.clip(q, info.min, info.max).astype(self._in_dtype)
        return crops.astype(self._in_dtype)

    def classify(self, crops: np.ndarray, batch_size: int = 8) -> list[CellPrediction]:
        """Classify prepared crops (uint8 N x S x S x 3) with the bundle's threshold and review band."""
        if len(crops) == 0:
            return []
        low, high = self.bundle.review_band
        thr = self.bundle.threshold
        preds = []
        for start in range(0, len(crops), batch_size):
            out = self.raw(crops[start : start + batch_size])
            for p, lg, cam in zip(out["probability"], out["logit"], out["cam"], strict=True):
                p = float(p)
                positive = p >= thr
                pred = CellPrediction(
                    probability=p,
                    label=self.bundle.labels[1 if positive else 0],
                    needs_review=low <= p <= high,
                    logit=float(lg),
                    cam=cam.astype(np.float32),
                    positive=positive,
                )
                preds.append(pred)
        return preds

    def self_test(self) -> SelfTestResult:
        """Run the bundle's golden crops and compare with the outputs recorded at conversion."""
        g = self.bundle.golden
        t0 = time.perf_counter()
        out = self.raw(g.crops)
        diff = float(np.max(np.abs(out["probability"] - g.probabilities))) if len(g.crops) else 0.0
        passed = diff <= g.tolerance and np.all(np.isfinite(out["probability"]))
        msg = (
            f"self-test passed: {len(g.crops)} golden crops, max |dp| = {diff:.4f} <= {g.tolerance}"
            if passed
            else f"self-test FAILED: max |dp| = {diff:.4f} > tolerance {g.tolerance} on {len(g.crops)} golden crops; "
            "the runtime or the model file does not reproduce the converter's outputs. Reinstall the runtime or re-convert"
        )
        return SelfTestResult(bool(passed), diff, g.tolerance, len(g.crops), time.perf_counter() - t0, msg)


def _quant(detail: dict) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)
