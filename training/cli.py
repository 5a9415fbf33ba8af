"""Workstation commands: synth, train, demo-model. TensorFlow is imported inside the commands only."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click

from device.config import DEMO_BUNDLE, DEMO_FIELDS


@click.group()
def synth():
    """Generate SYNTHETIC single-cell datasets and smear fields (for tests and demos, never clinical)."""


@synth.command("cells")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--subjects", default=10, show_default=True, help="Number of synthetic subjects (half ALL, half healthy).")
@click.option("--cells-per-subject", default=20, show_default=True)
@click.option("--size", default=450, show_default=True, help="Image side in pixels (C-NMC uses 450).")
@click.option("--seed", default=0, show_default=True)
def synth_cells(out, subjects, cells_per_subject, size, seed):
    """Single-cell images in the C-NMC 2019 layout under OUT."""
    from training.synth import write_cell_dataset

    summary = write_cell_dataset(out, n_subjects=subjects, cells_per_subject=cells_per_subject, size=size, seed=seed)
    click.echo(json.dumps({k: v for k, v in summary.items() if k in ("n_images", "per_class", "seed", "synthetic")}))


@synth.command("fields")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("-n", "count", default=3, show_default=True)
@click.option("--width", default=1280, show_default=True)
@click.option("--height", default=960, show_default=True)
@click.option("--um-per-px", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True)
def synth_fields(out, count, width, height, um_per_px, seed):
    """Whole smear fields (JPEG + JSON of white-cell boxes) under OUT."""
    from training.synth import write_fields

    paths = write_fields(out, n=count, width=width, height=height, um_per_px=um_per_px, seed=seed)
    click.echo(f"{len(paths)} synthetic fields written to {out}")


@click.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="runs/latest", show_default=True, type=click.Path(file_okay=False))
@click.option("--input-size", default=300, show_default=True)
@click.option("--epochs", default=20, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--learning-rate", default=1e-3, show_default=True)
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none, or a local weights file.")
@click.option("--bn-momentum", type=float, default=None, help="BatchNorm momentum override (0.9 for short from-scratch runs).")
@click.option("--seed", default=0, show_default=True)
def train(data, out, input_size, epochs, batch_size, learning_rate, weights, bn_momentum, seed):
    """Train the EfficientNetB3 classifier on DATA (C-NMC layout or class folders)."""
    from training.train import TrainOptions, run_training

    opts = TrainOptions(input_size=input_size, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                        weights=weights, bn_momentum=bn_momentum, seed=seed)
    try:
        metrics = run_training(data, out, opts)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    from training.metrics import fmt

    t = metrics["test"]
    lo, hi = t["accuracy"]["ci95"]
    click.echo(f"held-out test: accuracy {fmt(t['accuracy']['value'])} (95% CI {fmt(lo)}-{fmt(hi)}), "
               f"sensitivity {fmt(t['sensitivity']['value'])}, specificity {fmt(t['specificity']['value'])} "
               f"on {t['n']} images" + (" [SYNTHETIC data]" if metrics["synthetic_data"] else ""))
    click.echo(f"model and report in {out}")


@click.command("demo-model")
@click.option("--subjects", default=40, show_default=True)
@click.option("--cells-per-subject", default=40, show_default=True)
@click.option("--input-size", default=96, show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--bundle", "bundle_dir", default=str(DEMO_BUNDLE), show_default=True, type=click.Path(file_okay=False))
@click.option("--fields", "fields_dir", default=str(DEMO_FIELDS), show_default=True, type=click.Path(file_okay=False))
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Keep the synthetic data and run folder here.")
def demo_model(subjects, cells_per_subject, input_size, epochs, seed, bundle_dir, fields_dir, keep):
    """Rebuild the shipped SYNTHETIC demo bundle and sample fields (about 15-30 minutes on 2 cores)."""
    from convert.cli import run_convert
    from training.synth import write_cell_dataset, write_fields
    from training.train import TrainOptions, run_training

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="leukocam-demo-"))
    try:
        data = work / "cells"
        click.echo(f"generating {subjects * cells_per_subject} synthetic cells in {data}")
        write_cell_dataset(data, n_subjects=subjects, cells_per_subject=cells_per_subject, size=2 * input_size, seed=seed)
        opts = TrainOptions(input_size=input_size, epochs=epochs, batch_size=32, weights="none", bn_momentum=0.9,
                            patience=10, seed=seed)
        metrics = run_training(data, work / "run", opts)
        click.echo(f"held-out synthetic test accuracy {metrics['test']['accuracy']['value']:.3f}")
        # The demo must fit the repository (<= 15 MB) and pass the default fidelity gate.
        run_convert(work / "run" / "model.keras", data, bundle_dir, mode="auto", max_mb=15, name="leukocam-demo-synthetic",
                    seed=seed)
        if Path(fields_dir).exists():
            shutil.rmtree(fields_dir)
        write_fields(fields_dir, n=3, width=1280, height=960, um_per_px=0.1, seed=seed)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(f"demo bundle in {bundle_dir}, sample fields in {fields_dir}")
