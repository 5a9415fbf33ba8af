"""The convert report: what `leukocam convert` measured, as markdown (convert_report.md in the bundle).

The quantization ladder with each tried mode's size, per-crop latency (same
run, same machine) and gate figures; the fidelity gate of the shipped mode
over all crops and per class; every flip (a crop whose label changed, with
its float and converted probabilities); the test split measured once; the
field-path parity. Everything comes from model.json except the full list of
flips (model.json keeps the first FLIPS_IN_META). Importable without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from device.bundle_meta import BundleMeta

REPORT_FILE = "convert_report.md"
ORDER_MARGIN = 1.10
"""A later rung counts as faster than an earlier one when it took less than 1/1.10 of its time (timing noise)."""
MAX_FLIPS = 1000
"""The report lists at most this many flips (a conversion with more fails the gate many times over)."""


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _cell(text: Any) -> str:
    """Text for a markdown table cell: its pipes escaped (failures read "|delta sensitivity| ...")."""
    return str(text).replace("|", "\\|")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f}" if n_bytes >= 1e6 else f"{n_bytes / 1e6:.3f}"


def _times(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}×" if value >= 10 else f"{value:.2f}×"


def order_notes(attempts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the measured latencies disagree with the ladder's order: a later mode faster than an earlier one."""
    timed = [a for a in attempts if a.get("latency_ms") is not None]
    notes = []
    for j, later in enumerate(timed):
        for earlier in timed[:j]:
            if later["latency_ms"] * ORDER_MARGIN < earlier["latency_ms"]:
                notes.append(
                    f"{later['mode']} ({later['latency_ms']:.2f} ms) ran faster than {earlier['mode']} "
                    f"({earlier['latency_ms']:.2f} ms), which the ladder tries first"
                )
                break
    return notes


def ladder_markdown(
    attempts: Sequence[Mapping[str, Any]],
    ladder: Sequence[str] | None = None,
    latency: Mapping[str, Any] | None = None,
) -> str:
    """The table of the modes tried (and, for --quant auto, the rungs not reached), fastest expected first."""
    int8_ms = next((a.get("latency_ms") for a in attempts if a.get("mode") == "int8"), None)
    lines = ["## Quantization ladder", ""]
    if ladder:
        lines += [
            "`--quant auto` tries the modes in this fixed order (expected speed on a Pi's CPU, fastest first) and "
            "keeps the first that passes the gate.",
            "",
        ]
    if latency:
        lines += [
            f"Latency: median of {latency.get('repeats')} single-crop calls (batch 1) through the device's "
            f"classifier, {latency.get('threads')} threads, runtime {latency.get('runtime')}, CPU "
            f"{latency.get('cpu')}; every mode in the same run.",
            "",
        ]
    lines += [
        "| # | mode | result | size MB | ms / crop | × int8 | agreement | Δ sensitivity | Δ specificity | CAM r | flips |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    tried = {a.get("mode") for a in attempts}
    for i, a in enumerate(attempts, 1):
        if a.get("skipped"):
            result = _cell(f"skipped: {a['skipped']}")
        elif a.get("passed"):
            result = "PASS" + (" (shipped)" if a.get("chosen") else "")
        else:
            result = _cell("FAIL: " + "; ".join(a.get("failures") or []))
            result += " (shipped, forced)" if a.get("chosen") else ""
        ms = a.get("latency_ms")
        vs = ms / int8_ms if ms is not None and int8_ms else None
        size = a.get("bytes")
        lines.append(
            f"| {i} | {a.get('mode')} | {result} | {'' if size is None else _mb(size)} | {_f(ms, 2)} | "
            f"{_times(vs)} | {_f(a.get('label_agreement'), 4)} | {_signed(a.get('delta_sensitivity'))} | "
            f"{_signed(a.get('delta_specificity'))} | {_f(a.get('cam_correlation_mean'))} | "
            f"{'' if a.get('flips') is None else a['flips']} |"
        )
    for j, label in enumerate((r for r in ladder or () if r not in tried), len(attempts) + 1):
        lines.append(f"| {j} | {label} | not tried: an earlier mode passed |  |  |  |  |  |  |  |  |")
    notes = order_notes(attempts)
    lines.append("")
    for a in attempts:
        tuning = a.get("fine_tuning")
        if isinstance(tuning, Mapping):
            losses = ", ".join(_f(v, 4) for v in tuning.get("loss_per_epoch") or ())
            clips = tuning.get("clipped_tensors")
            clipped = (
                f"{clips} batch-norm outputs clipped at their {tuning.get('clip_quantile')} quantile, " if clips else ""
            )
            lines += [
                f"{a.get('mode')}: a copy of the model fine-tuned for int8 (convert.qat: {clipped}the converter's "
                f"rounding simulated at {tuning.get('fake_quant_tensors')} tensors, distilled from the float "
                f"model) for {tuning.get('epochs')} epochs on {tuning.get('crops')} train-split crops in "
                f"{_f(tuning.get('seconds'), 0)} s (loss per epoch: {losses}), then its logit's bias corrected by "
                f"{_signed(tuning.get('logit_bias_correction'))} (the offset of its int8 logit near the threshold on "
                f"{tuning.get('bias_measured_on')} of those crops); its gate compares it with the original float "
                "model, like every other mode.",
                "",
            ]
    if notes:
        lines.append(
            "**The measured order differs from the ladder's** (the ladder keeps its fixed order, set by the "
            "expected speed on a Pi; this machine measured otherwise): " + "; ".join(notes) + "."
        )
    elif sum(a.get("latency_ms") is not None for a in attempts) > 1:
        lines.append("The measured latencies agree with the ladder's order.")
    return "\n".join(lines) + "\n"


def gate_markdown(meta: BundleMeta, flips: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The shipped mode's gate: the figures over all crops, per class, the warnings and the flips."""
    v = dict(meta.verification or {})
    gate = dict(meta.gate or {})
    n = v.get("n", 0)
    min_crops = gate.get("min_crops")
    lines = [
        f"## Fidelity gate: {meta.quantization.label} on {n} held-out crops ({v.get('split', 'held-out')} split)",
        "",
        "| figure | measured | gate | |",
        "| --- | --- | --- | --- |",
    ]

    def row(name: str, value: Any, rule: str, ok: bool | None) -> None:
        mark = "" if ok is None else ("ok" if ok else "**FAIL**")
        lines.append(f"| {name} | {value} | {_cell(rule)} | {mark} |")

    agree, ds, cam = v.get("label_agreement"), v.get("delta_sensitivity"), v.get("cam_correlation_mean")
    if "min_agreement" in gate:
        row("label agreement", _f(agree, 4), f"≥ {gate['min_agreement']}", agree >= gate["min_agreement"])
        row(
            "Δ sensitivity",
            _signed(ds),
            f"|Δ| ≤ {gate['max_delta_sensitivity']}",
            None if ds is None else abs(ds) <= gate["max_delta_sensitivity"],
        )
        row(
            "CAM correlation (mean)",
            _f(cam),
            f"≥ {gate['min_cam_correlation']}",
            None if cam is None else cam >= gate["min_cam_correlation"],
        )
    if min_crops is not None:
        enough = v.get("gate_crops_enough", n >= min_crops)
        lines.append(f"| held-out crops | {n} | ≥ {min_crops} | {'ok' if enough else '**too few** (warning)'} |")
    lines += [
        "",
        f"|Δ probability| mean {_f(v.get('mean_abs_dprob'), 4)}, max {_f(v.get('max_abs_dprob'), 4)}; "
        f"Δ specificity {_signed(v.get('delta_specificity'))}, Δ AUC {_signed(v.get('delta_auc'), 4)}.",
        "",
    ]
    if gate:
        verdict = "PASS" if gate.get("passed") else "FAIL: " + "; ".join(gate.get("failures") or [])
        lines.append(f"Gate: **{verdict}**" + (" (written with --force)" if gate.get("forced") else "") + ".")
        for warning in gate.get("warnings") or ():
            lines.append(f"\n**Warning:** {warning}.")
        lines.append("")
    per_class = v.get("per_class") or {}
    if per_class:
        within = gate.get("per_class") or {}
        lines += [
            "### Per class",
            "",
            "The gate decides on the figures over all crops (Δ sensitivity is the positive class's own); this "
            "table applies the same thresholds to each class on its own (Δ sensitivity's to Δ specificity), "
            "for reading, not deciding.",
            "",
            "| class | crops | agreement | rate | float | converted | Δ | CAM r | flips | against the gate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in per_class.values():
            problems = within.get(c["label"])
            verdict = (
                "" if problems is None else ("within" if not problems else _cell("outside: " + "; ".join(problems)))
            )
            lines.append(
                f"| {c['label']} | {c['n']} | {_f(c['label_agreement'], 4)} | {c['metric']} | {_f(c['float'])} | "
                f"{_f(c['quantized'])} | {_signed(c['delta'])} | {_f(c.get('cam_correlation_mean'))} | {c['flips']} | "
                f"{verdict} |"
            )
        pos = per_class.get("positive") or {}
        if pos.get("n"):
            lines += [
                "",
                f"Resolution: one {pos['label']} crop is {100 / pos['n']:.2f} points of sensitivity "
                f"(the gate allows {100 * gate.get('max_delta_sensitivity', 0.01):.1f}).",
            ]
        lines.append("")
    flips = list(flips if flips is not None else v.get("flips") or [])
    total = v.get("flips_total", len(flips))
    lines += [f"### Flips: {total} crop(s) changed label", ""]
    if flips:
        lines += [
            "| # | crop | true label | float p | converted p | float → converted |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in flips[:MAX_FLIPS]:
            lines.append(
                f"| {f['index']} | {_cell(f.get('file') or '')} | {f.get('label') or ''} | {f['float_probability']:.4f} | "
                f"{f['quantized_probability']:.4f} | {f['float_label']} → {f['quantized_label']} |"
            )
        if total > min(len(flips), MAX_FLIPS):
            lines.append(f"\n{total - min(len(flips), MAX_FLIPS)} more not listed.")
    else:
        lines.append("None: the float and converted models give every held-out crop the same label.")
    return "\n".join(lines) + "\n"


def convert_report(meta: BundleMeta, flips: Sequence[Mapping[str, Any]] | None = None, tflite_bytes: int = 0) -> str:
    """The whole report: header, ladder, gate (overall, per class, flips), test split, field-path parity."""
    q = meta.quantization
    lines = [f"# Convert report: {meta.name or 'bundle'}", ""]
    if meta.synthetic:
        lines += ["**SYNTHETIC**: trained on synthetic data; a demonstration, never clinical.", ""]
    size = f", {_mb(tflite_bytes)} MB" if tflite_bytes else ""
    lines.append(f"Shipped mode: **{q.label}**{size}, input {q.input_type or 'n/a'}, {meta.input_size} px.")
    lat = q.latency or {}
    if lat.get("ms_per_crop") is not None:
        cost = ""
        if lat.get("vs_int8") is not None and q.label != "int8":
            cost = f": {_times(lat['vs_int8'])} the int8 time per cell"
        lines.append(
            f"Measured at conversion: {lat['ms_per_crop']:.2f} ms per crop "
            f"({lat.get('threads')} threads, batch 1){cost}."
        )
    fallbacks = q.fallbacks()
    if fallbacks:
        lines.append(
            "Fallback: "
            + "; ".join(f"{label} was not kept ({'; '.join(why) or 'failed'})" for label, why in fallbacks)
            + "."
        )
    lines.append("")
    if q.attempts:
        lines.append(ladder_markdown(q.attempts, q.ladder, q.latency))
    lines.append(gate_markdown(meta, flips))
    m = meta.metrics or {}
    if m.get("float") and m.get("quantized"):
        split = m.get("split")
        title = "The test split, measured once on the shipped model" if split == "test" else "Metrics"
        title += f" ({m['n']} crops)" if m.get("n") else ""
        lines += [
            f"## {title}",
            "",
            "| metric | float | converted |",
            "| --- | --- | --- |",
        ]
        for key in ("sensitivity", "specificity", "accuracy", "auc"):
            a, b = m["float"].get(key), m["quantized"].get(key)
            a = a.get("value") if isinstance(a, Mapping) else a
            b = b.get("value") if isinstance(b, Mapping) else b
            lines.append(f"| {key} | {_f(a)} | {_f(b)} |")
        lines.append("")
    if meta.field_parity:
        from training.parity import parity_markdown

        lines += ["## Field-path parity", "", parity_markdown(dict(meta.field_parity))]
    return "\n".join(lines).rstrip() + "\n"
