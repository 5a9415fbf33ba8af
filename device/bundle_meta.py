"""`model.json` as a typed, versioned object: `BundleMeta`.

`convert` builds a BundleMeta and `convert.bundle_writer` writes `to_dict()`;
`device.bundle.load_bundle` reads the file back with `BundleMeta.from_dict`,
which checks every field before anything runs and raises a BundleError that
names the field and says what to do. The fields code reads are typed
(labels, sizes, threshold, output names, CAM shape, golden set, quantization,
preprocess contract); the reports convert records (verification, metrics,
gate, field parity, training summary) stay plain mappings with typed
accessors for what is read from them (`quantized_metrics`, ...).

`from_dict(d).to_dict() == d` for every model.json `convert` writes (the
shipped demo bundle's among them): keys this module does not know are kept in
`extra`, and optional top-level keys the file had (even as null) are written
back. Importable without TensorFlow.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.errors import BundleError
from device.preprocess import PreprocessContract

SCHEMA_VERSION = 1
"""The model.json layout this device reads and `convert` writes."""

REQUIRED_KEYS = (
    "schema_version",
    "labels",
    "input_size",
    "preprocess",
    "signature",
    "outputs",
    "threshold",
    "review_band",
    "cam",
    "quantization",
    "tflite_sha256",
    "created",
    "golden",
)
OUTPUT_ROLES = ("probability", "logit", "cam")
HEADLINE_METRICS = ("accuracy", "sensitivity", "specificity", "auc", "ppv", "npv")

# Optional keys a BundleMeta built in code writes even when unset (null or the default):
# what `leukocam convert` has always recorded. A BundleMeta read from a file writes back exactly
# the optional keys that file had.
CONVERT_WRITES = frozenset({"name", "synthetic", "field_parity", "preprocess.crop_um"})
_OPTIONAL = ("name", "synthetic", "tflite_bytes", "source_model_sha256")
_REPORTS = ("input", "training", "verification", "gate", "metrics", "field_parity")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REDO = "re-run `leukocam convert`"


class _Fields:
    """Reads one JSON object for from_dict: typed getters that raise BundleError naming the field."""

    def __init__(self, data: Any, where: str, source: str):
        if not isinstance(data, Mapping):
            raise BundleError(f"{source}: {where or 'model.json'} must be a JSON object, got {_kind(data)}; {_REDO}")
        self.data, self.where, self.source = data, where, source
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> BundleError:
        return BundleError(f"{self.source}: {self.name(key)} {problem}; {_REDO}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def required(self, key: str) -> Any:
        if key not in self.data:
            raise self.fail(key, "is missing")
        return self.raw(key)

    def text(self, key: str, *, required: bool = False, nonempty: bool = False) -> str | None:
        value = self.required(key) if required else self.raw(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or (nonempty and not value):
            raise self.fail(key, f"must be a{' non-empty' if nonempty else ''} string, got {value!r}")
        return value

    def number(self, key: str, *, required: bool = False, low: float | None = None, high: float | None = None):
        value = self.required(key) if required else self.raw(key)
        if value is None and not required:
            return None
        if not _is_number(value) or (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                expected = f"a number in {low}..{high}"
            else:
                expected = (
                    f"a number{f' >= {low}' if low is not None else ''}{f' <= {high}' if high is not None else ''}"
                )
            raise self.fail(key, f"must be {expected}, got {value!r}")
        return value

    def integer(self, key: str, *, required: bool = False, low: int | None = None) -> int | None:
        value = self.required(key) if required else self.raw(key)
        if value is None and not required:
            return None
        if not _is_int(value) or (low is not None and value < low):
            raise self.fail(key, f"must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def labels(self, key: str) -> tuple[str, str]:
        labels = self.raw(key)
        if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, str) for x in labels)):
            raise BundleError(f"{self.source}: {self.name(key)} must be [negative, positive], got {labels!r}")
        return labels[0], labels[1]

    def band(self, key: str, threshold: float) -> tuple[float, float]:
        band = self.required(key)
        if (
            not (isinstance(band, list) and len(band) == 2 and all(_is_number(v) for v in band))
            or not 0.0 <= band[0] <= band[1] <= 1.0
        ):
            raise self.fail(key, f"must be [low, high], two numbers with 0 <= low <= high <= 1, got {band!r}")
        if not band[0] <= threshold <= band[1]:
            raise self.fail(key, f"{band!r} must contain threshold {threshold!r} (low <= threshold <= high)")
        return band[0], band[1]

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of strings, got {_kind(value)}")
        return tuple(value)

    def records(self, key: str) -> tuple[dict[str, Any], ...] | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.fail(key, f"must be a list of objects, got {_kind(value)}")
        return tuple(copy.deepcopy(dict(v)) for v in value)

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a JSON object, got {_kind(value)}")
        return copy.deepcopy(dict(value))

    def extra(self) -> dict[str, Any]:
        """The keys no getter asked for, kept for the round trip."""
        return {k: copy.deepcopy(v) for k, v in self.data.items() if k not in self.used}


def _is_number(value: Any) -> bool:
    """An int or a finite float (Python's json reads NaN and Infinity; model.json never has them)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), repr(value))


def _put(out: dict[str, Any], key: str, value: Any, present: frozenset[str], unset: Any = None) -> None:
    """Write an optional key when it is set, or when the source had it."""
    if value != unset or key in present:
        out[key] = value


@dataclass(frozen=True)
class OutputNames:
    """The model's output tensor name for each role the device reads."""

    probability: str = "probability"
    logit: str = "logit"
    cam: str = "cam"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def by_role(self) -> dict[str, str]:
        """{"probability": name, "logit": name, "cam": name}."""
        return {role: getattr(self, role) for role in OUTPUT_ROLES}

    def to_dict(self) -> dict[str, Any]:
        return {**self.by_role(), **copy.deepcopy(dict(self.extra))}

    @classmethod
    def _read(cls, f: _Fields) -> OutputNames:
        names = {role: f.text(role, required=True, nonempty=True) for role in OUTPUT_ROLES}
        return cls(**names, extra=f.extra())


@dataclass(frozen=True)
class CamInfo:
    """The CAM output: its spatial shape, and how convert made it (descriptive)."""

    shape: tuple[int, int]
    layer: str | None = None
    method: str | None = None
    sign: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape)}
        for key in ("layer", "method", "sign"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **copy.deepcopy(dict(self.extra))}

    @classmethod
    def _read(cls, f: _Fields) -> CamInfo:
        shape = f.required("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
            raise f.fail("shape", f"must be [height, width] in cells, got {shape!r}")
        return cls(
            shape=(shape[0], shape[1]),
            layer=f.text("layer"),
            method=f.text("method"),
            sign=f.text("sign"),
            extra=f.extra(),
        )


@dataclass(frozen=True)
class GoldenInfo:
    """The golden set (golden.npz) for the start-up self-test."""

    tolerance: float
    """Largest |probability difference| the self-test accepts."""
    sha256: str | None = None
    file: str | None = None
    count: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tolerance": self.tolerance}
        for key in ("file", "count", "sha256"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **copy.deepcopy(dict(self.extra))}

    @classmethod
    def _read(cls, f: _Fields) -> GoldenInfo:
        return cls(
            tolerance=f.number("tolerance", required=True, low=0),
            sha256=f.text("sha256"),
            file=f.text("file"),
            count=f.integer("count", low=0),
            extra=f.extra(),
        )


@dataclass(frozen=True)
class QuantizationInfo:
    """How the model was quantized; `mode` is what the device shows."""

    mode: str
    """int8, dynamic, int16x8, float16 or float32."""
    float_layers: tuple[str, ...] | None = None
    """int8 only: the tensors kept in float (selective int8)."""
    calibration_images: int | None = None
    input_type: str | None = None
    attempts: tuple[Mapping[str, Any], ...] | None = None
    """Every mode convert tried, in order, with its gate result (and, since the measured ladder, its bytes,
    per-crop latency and gate figures; the one shipped has "chosen": true)."""
    worst_layers: tuple[Mapping[str, Any], ...] | None = None
    ladder: tuple[str, ...] | None = None
    """`--quant auto`: the modes in the order convert tries them (expected speed, fastest first)."""
    latency: Mapping[str, Any] | None = None
    """The shipped mode's per-crop latency measured at conversion: {"ms_per_crop", "threads", "batch", "repeats",
    "cpu", "runtime", "int8_ms_per_crop", "vs_int8", "order_agrees", "order_note"} (None: not measured)."""
    fine_tuning: Mapping[str, Any] | None = None
    """int8 after quantization-aware fine-tuning: how it ran (convert.qat); the weights in the bundle are then the
    fine-tuned copy's, verified against the original float model. None: post-training quantization only."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The shipped mode as convert names it, e.g. "int8 with 10 float layers"."""
        for attempt in self.attempts or ():
            if attempt.get("chosen") and isinstance(attempt.get("mode"), str):
                return attempt["mode"]
        n = len(self.float_layers or ())
        return self.mode + (f" with {n} float layers" if n else "")

    @property
    def speed_vs_int8(self) -> float | None:
        """How many times the int8 per-crop latency the shipped mode took at conversion; None when not measured."""
        value = (self.latency or {}).get("vs_int8")
        return float(value) if _is_number(value) else None

    def fallbacks(self) -> list[tuple[str, list[str]]]:
        """The modes tried before the shipped one that failed, with why: [(label, failures)]."""
        out = []
        attempts = self.attempts or ()
        marked = any(a.get("chosen") for a in attempts)  # older bundles: the shipped one is the one named `label`
        for attempt in attempts:
            if attempt.get("chosen") if marked else attempt.get("mode") == self.label:
                break
            if not attempt.get("passed"):
                out.append((str(attempt.get("mode")), [str(f) for f in attempt.get("failures") or ()]))
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.float_layers is not None:
            out["float_layers"] = list(self.float_layers)
        for key in ("calibration_images", "input_type"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("attempts", "worst_layers"):
            if getattr(self, key) is not None:
                out[key] = [copy.deepcopy(dict(r)) for r in getattr(self, key)]
        if self.ladder is not None:
            out["ladder"] = list(self.ladder)
        for key in ("latency", "fine_tuning"):
            if getattr(self, key) is not None:
                out[key] = copy.deepcopy(dict(getattr(self, key)))
        return {**out, **copy.deepcopy(dict(self.extra))}

    @classmethod
    def _read(cls, f: _Fields) -> QuantizationInfo:
        return cls(
            mode=f.text("mode", required=True, nonempty=True),
            float_layers=f.strings("float_layers"),
            calibration_images=f.integer("calibration_images", low=0),
            input_type=f.text("input_type"),
            attempts=f.records("attempts"),
            worst_layers=f.records("worst_layers"),
            ladder=f.strings("ladder"),
            latency=f.mapping("latency"),
            fine_tuning=f.mapping("fine_tuning"),
            extra=f.extra(),
        )


@dataclass(frozen=True)
class BundleMeta:
    """model.json, schema version 1.

    Built by `convert` (tflite_sha256, created and golden are then None until
    `convert.bundle_writer.write_bundle` fills them in) or read from a file with
    `from_dict`, which requires them. Treat the report mappings as read-only.
    """

    labels: tuple[str, str]
    """(negative, positive)."""
    contract: PreprocessContract
    """`preprocess` in model.json; its input_size is `input_size`."""
    signature: str
    outputs: OutputNames
    threshold: float
    review_band: tuple[float, float]
    cam: CamInfo
    quantization: QuantizationInfo
    tflite_sha256: str | None = None
    created: str | None = None
    golden: GoldenInfo | None = None
    schema_version: int = SCHEMA_VERSION
    name: str = ""
    synthetic: bool = False
    """True when the model was trained on SYNTHETIC data (never clinical)."""
    tflite_bytes: int | None = None
    source_model_sha256: str | None = None
    input: Mapping[str, Any] | None = None
    """How to feed the model (descriptive)."""
    training: Mapping[str, Any] | None = None
    """The training run's data summary, options and test metrics."""
    verification: Mapping[str, Any] | None = None
    """Float against converted on the gate's split (convert.verify.compare)."""
    gate: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    """{"split", "n", "float", "quantized"}: the test split measured once on the shipped model."""
    field_parity: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Top-level keys this version does not know, kept for the round trip."""
    present: frozenset[str] = field(default=CONVERT_WRITES, repr=False, compare=False)
    """Optional keys written even when unset (see CONVERT_WRITES); from_dict records the source's."""

    # -- typed reads -------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.contract.input_size

    @property
    def negative_label(self) -> str:
        return self.labels[0]

    @property
    def positive_label(self) -> str:
        return self.labels[1]

    @property
    def quantized_metrics(self) -> Mapping[str, Any]:
        """The converted model's metrics: on the test split when convert measured it, else on the gate's split."""
        return (self.metrics or {}).get("quantized") or (self.verification or {}).get("quantized_metrics") or {}

    @property
    def float_metrics(self) -> Mapping[str, Any]:
        """The float model's metrics on the same split as `quantized_metrics`."""
        return (self.metrics or {}).get("float") or (self.verification or {}).get("float_metrics") or {}

    def headline_metrics(self, keys: tuple[str, ...] = HEADLINE_METRICS) -> dict[str, float | None]:
        """{metric: value} of `quantized_metrics` for the keys it has (a rate's point estimate, AUC as is)."""
        quant = self.quantized_metrics
        return {k: quant[k].get("value") if isinstance(quant[k], Mapping) else quant[k] for k in keys if k in quant}

    @property
    def gate_passed(self) -> bool | None:
        """Whether the fidelity gate passed at conversion; None when model.json does not say."""
        return None if self.gate is None else bool(self.gate.get("passed"))

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """model.json as a JSON-ready dict (a fresh copy)."""
        present = self.present
        preprocess = self.contract.to_dict()
        if preprocess.get("crop_um") is None and "preprocess.crop_um" not in present:
            preprocess.pop("crop_um", None)
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "labels": list(self.labels),
            "input_size": self.input_size,
            "preprocess": preprocess,
            "signature": self.signature,
            "outputs": self.outputs.to_dict(),
            "threshold": self.threshold,
            "review_band": list(self.review_band),
            "cam": self.cam.to_dict(),
            "quantization": self.quantization.to_dict(),
        }
        _put(out, "name", self.name, present, unset="")
        _put(out, "synthetic", self.synthetic, present, unset=False)
        for key in ("tflite_sha256", "tflite_bytes", "created", "source_model_sha256"):
            _put(out, key, getattr(self, key), present)
        if self.golden is not None:
            out["golden"] = self.golden.to_dict()
        for key in _REPORTS:
            value = getattr(self, key)
            _put(out, key, None if value is None else copy.deepcopy(dict(value)), present)
        return {**out, **copy.deepcopy(dict(self.extra))}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "model.json") -> BundleMeta:
        """Check a parsed model.json and return it typed.

        Raises:
            BundleError: not an object, a missing field, a schema this device does not read, or a
                field of the wrong type or range; the message names the field.
        """
        source = str(source)
        _check_header(data, source)
        f = _Fields(data, "", source)
        f.raw("schema_version")
        labels = f.labels("labels")
        contract = cls._contract(f)
        threshold = f.number("threshold", required=True, low=0, high=1)
        band = f.band("review_band", threshold)
        sha = f.text("tflite_sha256", required=True)
        if not _SHA256.fullmatch(sha):
            raise f.fail("tflite_sha256", f"must be 64 lowercase hex digits, got {sha[:16]!r}")
        fields: dict[str, Any] = {
            "labels": labels,
            "contract": contract,
            "signature": f.text("signature", required=True, nonempty=True),
            "outputs": OutputNames._read(_Fields(f.required("outputs"), "outputs", source)),
            "threshold": threshold,
            "review_band": band,
            "cam": CamInfo._read(_Fields(f.required("cam"), "cam", source)),
            "quantization": QuantizationInfo._read(_Fields(f.required("quantization"), "quantization", source)),
            "tflite_sha256": sha,
            "created": f.text("created", required=True),
            "golden": GoldenInfo._read(_Fields(f.required("golden"), "golden", source)),
            "name": f.text("name") or "",
            "synthetic": f.flag("synthetic", False),
            "tflite_bytes": f.integer("tflite_bytes", low=0),
            "source_model_sha256": f.text("source_model_sha256"),
            **{key: f.mapping(key) for key in _REPORTS},
        }
        present = {k for k in (*_OPTIONAL, *_REPORTS) if k in data}
        if "crop_um" in data["preprocess"]:
            present.add("preprocess.crop_um")
        return cls(**fields, extra=f.extra(), present=frozenset(present))

    @staticmethod
    def _contract(f: _Fields) -> PreprocessContract:
        raw = f.raw("preprocess")
        if not isinstance(raw, Mapping):
            raise BundleError(f"{f.source}: bad preprocess contract (expected an object, got {_kind(raw)})")
        try:
            contract = PreprocessContract.from_dict(dict(raw))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{f.source}: bad preprocess contract ({exc})") from None
        input_size = f.raw("input_size")
        if contract.input_size != input_size:
            raise BundleError(
                f"{f.source}: input_size {input_size} differs from preprocess.input_size {contract.input_size}"
            )
        return contract


def _check_header(data: Any, source: str) -> None:
    """An object with every required key, of the schema version this device reads."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{source}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise BundleError(f"{source}: missing fields {', '.join(missing)}; {_REDO}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"{source}: schema_version {data['schema_version']!r}, but this device reads version {SCHEMA_VERSION}; "
            "convert the model with the matching LeukoCam version"
        )
