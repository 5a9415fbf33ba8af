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
@click.option("--subjects", default=64, show_default=True)
@click.option("--cells-per-subject", default=56, show_default=True)
@click.option("--input-size", default=96, show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--bundle", "bundle_dir", default=str(DEMO_BUNDLE), show_default=True, type=click.Path(file_okay=False))
@click.option("--fields", "fields_dir", default=str(DEMO_FIELDS), show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--keep", type=click.Path(file_okay=False), default=None, help="Keep the synthetic data and run folder here."
)
def demo_model(subjects, cells_per_subject, input_size, epochs, seed, bundle_dir, fields_dir, keep):
    """Rebuild the shipped SYNTHETIC demo bundle and sample fields (about 15-30 minutes on 2 cores)."""
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
            patience=10,
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
        write_fields(fields_dir, n=3, width=1280, height=960, um_per_px=0.1, seed=seed)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(f"demo bundle in {bundle_dir}, sample fields in {fields_dir}")
