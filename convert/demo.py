"""`leukocam demo-model`: train a small model on SYNTHETIC cells and convert it into the shipped demo bundle.

It lives on the convert side because it runs both stages: convert imports
training, never the other way round.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from device.config import DEMO_BUNDLE, DEMO_FIELDS

DEMO_MAX_MB = 15
"""The demo must fit the repository."""


@click.command("demo-model")
@click.option(
    "--subjects",
    default=600,
    show_default=True,
    help="Synthetic subjects, each with its own stain: many subjects with few cells each cover the stain space.",
)
@click.option("--cells-per-subject", default=6, show_default=True)
@click.option("--input-size", default=96, show_default=True)
@click.option("--epochs", default=28, show_default=True)
@click.option(
    "--val-fraction",
    default=0.3,
    show_default=True,
    help="Subjects held out for validation: the threshold and the int8 gate (>= 1,000 crops) are measured there.",
)
@click.option("--test-fraction", default=0.25, show_default=True, help="Subjects held out for the final test.")
@click.option(
    "--target-sensitivity",
    default=0.98,
    show_default=True,
    help="The threshold is chosen on validation for this sensitivity (a margin over the 0.95 target).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--bundle", "bundle_dir", default=str(DEMO_BUNDLE), show_default=True, type=click.Path(file_okay=False))
@click.option("--fields", "fields_dir", default=str(DEMO_FIELDS), show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--keep", type=click.Path(file_okay=False), default=None, help="Keep the synthetic data and run folder here."
)
def demo_model(
    subjects,
    cells_per_subject,
    input_size,
    epochs,
    val_fraction,
    test_fraction,
    target_sensitivity,
    seed,
    bundle_dir,
    fields_dir,
    keep,
):
    """Rebuild the shipped SYNTHETIC demo bundle and sample fields (about 55 minutes on 2 cores)."""
    from convert.cli import run_convert
    from training.synth import write_cell_dataset, write_fields
    from training.train import TrainOptions, run_training

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="leukocam-demo-"))
    try:
        data = work / "cells"
        click.echo(f"generating {subjects * cells_per_subject} synthetic cells in {data}")
        cells = write_cell_dataset(
            data, n_subjects=subjects, cells_per_subject=cells_per_subject, size=2 * input_size, seed=seed
        )
        opts = TrainOptions(
            input_size=input_size,
            um_per_px=cells["um_per_px"],
            epochs=epochs,
            batch_size=32,
            weights="none",
            bn_momentum=0.9,
            patience=8,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            target_sensitivity=target_sensitivity,
            stages=1,  # from scratch (no ImageNet weights here): the whole network trains at once
            seed=seed,
        )
        metrics = run_training(data, work / "run", opts)
        click.echo(f"held-out synthetic test accuracy {metrics['test']['accuracy']['value']:.3f}")
        # The demo must fit the repository (<= 15 MB) and pass the default fidelity gate.
        run_convert(
            work / "run" / "model.keras",
            data,
            bundle_dir,
            mode="auto",
            max_mb=DEMO_MAX_MB,
            name="leukocam-demo-synthetic",
            seed=seed,
        )
        if Path(fields_dir).exists():
            shutil.rmtree(fields_dir)
        write_fields(fields_dir, n=3, width=1280, height=960, um_per_px=0.1, seed=seed, cell_style="cnmc")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(f"demo bundle in {bundle_dir}, sample fields in {fields_dir}")


def real_cell_predictions(bundle_dir: str | Path, cells_dir: str | Path) -> list[dict]:
    """A bundle's predictions on real single-cell images (C-NMC naming: the label is the file name's last
    part), through the device's single-cell path: `prepare_cell` with the bundle's contract, then the
    bundle's classifier. For the README's honest table of what a SYNTHETIC-trained model does on real cells."""
    import numpy as np

    from device.bundle import load_bundle
    from device.classifier import Classifier
    from device.imaging import decode_image
    from device.preprocess import prepare_cell

    bundle = load_bundle(bundle_dir)
    rows = []
    with Classifier(bundle, threads=2) as clf:
        for path in sorted(Path(cells_dir).rglob("*")):
            if path.suffix.lower() not in (".png", ".bmp", ".jpg", ".jpeg"):
                continue
            crop = prepare_cell(decode_image(path.read_bytes()), bundle.contract)
            pred = clf.classify(np.stack([crop]))[0]
            truth = path.stem.rsplit("_", 1)[-1]
            rows.append(
                {
                    "file": path.name,
                    "truth": "blast" if truth == "all" else "normal" if truth == "hem" else truth,
                    "probability": round(float(pred.probability), 3),
                    "label": pred.label,
                    "needs_review": bool(pred.needs_review),
                }
            )
    return rows


REAL_CELLS_BEGIN = (
    "<!-- real-cells: generated by convert.demo.real_cells_markdown; tests/test_demo_bundle.py checks it -->"
)
REAL_CELLS_END = "<!-- /real-cells -->"


def real_cells_markdown(rows: list[dict]) -> str:
    """The README table of `real_cell_predictions`, between the markers the test finds it by."""
    lines = [
        REAL_CELLS_BEGIN,
        "| real C-NMC 2019 cell | truth | P(blast) | the demo model says |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        said = r["label"] + (" (flagged for review)" if r["needs_review"] else "")
        lines.append(f"| {r['file']} | {r['truth']} | {r['probability']:.2f} | {said} |")
    return "\n".join([*lines, REAL_CELLS_END])
