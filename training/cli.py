"""Workstation commands: synth, data inspect, train, cv, evaluate. TensorFlow is imported inside the commands only.

Training never imports convert (convert imports training): `leukocam demo-model`, which trains and then
converts, lives in convert/demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def synth():
    """Generate SYNTHETIC single-cell datasets and smear fields (for tests and demos, never clinical)."""


@synth.command("cells")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--subjects", default=10, show_default=True, help="Number of synthetic subjects (half ALL, half healthy)."
)
@click.option("--cells-per-subject", default=20, show_default=True)
@click.option("--size", default=450, show_default=True, help="Image side in pixels (C-NMC uses 450).")
@click.option("--seed", default=0, show_default=True)
def synth_cells(out, subjects, cells_per_subject, size, seed):
    """Single-cell images in the C-NMC 2019 layout under OUT."""
    from training.synth import write_cell_dataset

    summary = write_cell_dataset(out, n_subjects=subjects, cells_per_subject=cells_per_subject, size=size, seed=seed)
    click.echo(
        json.dumps(
            {k: v for k, v in summary.items() if k in ("n_images", "per_class", "seed", "um_per_px", "synthetic")}
        )
    )


@synth.command("figure")
@click.argument("real", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True)
def synth_figure(real, out, seed):
    """Real cells under REAL (e.g. tests/data/cnmc-sample) beside SYNTHETIC ones, as one image OUT."""
    from training.synth import comparison_figure

    click.echo(f"written {comparison_figure(real, out, seed=seed)}")


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


BACKBONE_CHOICES = ["efficientnetb3", "efficientnetb0", "efficientnetb5", "resnet50", "inceptionv3", "smallcnn"]


def training_options(f):
    """The options train and cv share."""
    options = [
        click.option("--input-size", default=300, show_default=True),
        click.option(
            "--um-per-px",
            type=float,
            default=None,
            help="Pixel size of the training images in µm (C-NMC: about 0.045, see docs/scale.md); "
            "lets the device crop cells at the trained scale.",
        ),
        click.option("--epochs", default=20, show_default=True, help="Maximum epochs (stage 2 when --stages 2)."),
        click.option("--batch-size", default=16, show_default=True),
        click.option("--learning-rate", default=1e-3, show_default=True, help="Head / one-stage learning rate."),
        click.option("--backbone", type=click.Choice(BACKBONE_CHOICES), default="efficientnetb3", show_default=True),
        click.option(
            "--weights", default="imagenet", show_default=True, help="imagenet, none, or a local weights file."
        ),
        click.option(
            "--bn-momentum",
            type=float,
            default=None,
            help="BatchNorm momentum override (0.9 for short from-scratch runs).",
        ),
        click.option(
            "--stages",
            type=click.IntRange(1, 2),
            default=2,
            show_default=True,
            help="2: head on cached embeddings, then fine-tune; 1: everything at once.",
        ),
        click.option(
            "--balance",
            type=click.Choice(["smote", "class-weight", "oversample", "none"]),
            default="smote",
            show_default=True,
        ),
        click.option("--fine-tune-layers", default=20, show_default=True),
        click.option("--fine-tune-lr", default=1e-5, show_default=True),
        click.option(
            "--target-sensitivity",
            default=0.95,
            show_default=True,
            help="Threshold chosen on validation for this sensitivity.",
        ),
        click.option("--test-fraction", default=0.3, show_default=True),
        click.option(
            "--strategy",
            type=click.Choice(["default", "mirrored", "multiworker"]),
            default="default",
            show_default=True,
            help="default: one device; mirrored: every GPU of this machine; multiworker: several machines, "
            "one command per machine with TF_CONFIG (docs/training.md); with these two --batch-size is per replica "
            "(per GPU, or per CPU-only worker).",
        ),
        click.option(
            "--worker-timeout",
            type=click.FloatRange(min=1),
            default=300.0,
            show_default=True,
            help="multiworker: seconds a worker waits for the others (to join, or in one step) before it stops.",
        ),
        click.option("--mixed-precision", is_flag=True, help="mixed_float16 (only when a GPU is present)."),
        click.option("--no-augment", is_flag=True),
        click.option(
            "--nondeterministic",
            is_flag=True,
            help="Allow TensorFlow's faster non-deterministic kernels (the same seed may then differ).",
        ),
        click.option("--seed", default=0, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(kw: dict):
    from training.train import TrainOptions

    return TrainOptions(
        input_size=kw["input_size"],
        um_per_px=kw["um_per_px"],
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        learning_rate=kw["learning_rate"],
        backbone=kw["backbone"],
        weights=kw["weights"],
        bn_momentum=kw["bn_momentum"],
        stages=kw["stages"],
        balance=kw["balance"],
        fine_tune_layers=kw["fine_tune_layers"],
        fine_tune_lr=kw["fine_tune_lr"],
        target_sensitivity=kw["target_sensitivity"],
        test_fraction=kw["test_fraction"],
        strategy=kw["strategy"],
        worker_timeout=kw["worker_timeout"],
        mixed_precision=kw["mixed_precision"],
        augment=not kw["no_augment"],
        deterministic=not kw["nondeterministic"],
        seed=kw["seed"],
    )


def _guard(fn, *args, **kwargs):
    """Run fn, turning expected failures into one-line CLI errors (DatasetError is a LeukoCamError)."""
    from device.errors import LeukoCamError

    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, ValueError, LeukoCamError) as exc:
        raise click.ClickException(str(exc)) from None


def _warn_subjects(data) -> None:
    from training.datasets import read_dataset, subject_warning

    warning = subject_warning(_guard(read_dataset, data))
    if warning:
        click.secho(warning, fg="yellow", err=True)


@click.group()
def data():
    """Look at a dataset before training on it."""


@data.command("inspect")
@click.argument("root", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def data_inspect(root, as_json):
    """Counts per class and subject, image sizes, duplicates (identical or near-identical) and unreadable files of ROOT.

    ROOT is a dataset folder, a CSV manifest (path,label[,subject]) or a .zip of a folder, such as the
    dashboard's export of reviewed cells as downloaded.
    """
    from training.datasets import inspect_dataset

    report = _guard(inspect_dataset, root)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{report['root']}: {report['images']} labelled images {report['per_class']}, {report['subjects']} subjects"
    )
    if report.get("unpacked_to"):
        click.echo(f"(a zip: read from its copy unpacked in {report['unpacked_to']}; delete that to free the space)")
    if report["per_subject"]:
        counts = sorted(report["per_subject"].values())
        click.echo(f"images per subject: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")
    click.echo("image sizes: " + ", ".join(f"{k} x{v}" for k, v in report["sizes"].items()))
    for group in report["duplicates"]:
        click.echo("duplicate (identical bytes): " + " = ".join(group))
    for group in report["near_duplicates"]:
        click.echo(f"near-duplicate ({report['near_duplicate_rule']}): " + " ~ ".join(group))
    if report["duplicates"] or report["near_duplicates"]:
        click.echo("train and cv keep each group of duplicates, and the subjects that share one, in one split")
    for line in report["unreadable"]:
        click.echo(f"unreadable, skipped: {line}")
    if report["unlabelled"]:
        click.echo(
            f"{len(report['unlabelled'])} image files without a label were ignored, e.g. {report['unlabelled'][0]}"
        )
    for problem in report["problems"]:
        click.secho(problem, fg="yellow", err=True)


@click.command()
@click.argument("data", type=click.Path())
@click.option("--out", default="runs/latest", show_default=True, type=click.Path(file_okay=False))
@training_options
def train(data, out, **kw):
    """Train the classifier on DATA (C-NMC, ALL-IDB2, class folders, a CSV manifest, or a .zip of a folder)."""
    from training.metrics import fmt
    from training.train import run_training

    _warn_subjects(data)
    metrics = _guard(run_training, data, out, _options(kw))
    if metrics.get("chief") is False:  # a multiworker run's other workers: the chief writes the run
        click.echo(
            f"worker {metrics['worker']} of {metrics['workers']}: training done; the chief (worker 0) writes {out}"
        )
        return
    t = metrics["test"]
    lo, hi = t["accuracy"]["ci95"]
    click.echo(
        f"held-out test: accuracy {fmt(t['accuracy']['value'])} (95% CI {fmt(lo)}-{fmt(hi)}), "
        f"sensitivity {fmt(t['sensitivity']['value'])}, specificity {fmt(t['specificity']['value'])}, "
        f"weighted F1 {fmt(t['f1_weighted'])}, AUC {fmt(t['auc'])} "
        f"on {t['n']} images at threshold {t['threshold']:.3f}"
        + (" [SYNTHETIC data]" if metrics["synthetic_data"] else "")
    )
    click.echo(f"model and report in {out}")


@click.command()
@click.argument("data", type=click.Path())
@click.option("--out", default="runs/cv", show_default=True, type=click.Path(file_okay=False))
@click.option("--folds", default=5, show_default=True, help="Subject-grouped folds (StratifiedGroupKFold).")
@training_options
def cv(data, out, folds, **kw):
    """Subject-grouped k-fold cross-validation on DATA; writes folds.csv, per-fold metrics and mean +- sd."""
    from training.cv import run_cv
    from training.metrics import fmt

    if kw["strategy"] == "multiworker":
        raise click.UsageError(
            "cv trains its folds one after another on one machine: use --strategy default or mirrored"
        )
    _warn_subjects(data)
    summary = _guard(run_cv, data, out, _options(kw), folds)
    for key, s in summary["mean_sd"].items():
        click.echo(f"{key}: {fmt(s['mean'])} +- {fmt(s['sd'])} over {s['n']} folds")
    click.echo(
        f"fold assignments in {Path(out) / 'folds.csv'}, per-fold runs and cv.json in {out}"
        + (" [SYNTHETIC data]" if summary["synthetic_data"] else "")
    )


@click.command()
@click.argument("model", type=click.Path())
@click.option("--data", "data_dir", required=True, type=click.Path(), help="The dataset the model was trained on.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Default: <run>/evaluation.")
def evaluate(model, data_dir, out):
    """Write report.md, metrics.json and plots for an existing MODEL on its test split of DATA."""
    from training.evaluate import run_evaluate
    from training.metrics import fmt

    metrics = _guard(run_evaluate, model, data_dir, out)
    t = metrics["test"]
    click.echo(
        f"test: accuracy {fmt(t['accuracy']['value'])}, weighted F1 {fmt(t['f1_weighted'])}, "
        f"AUC {fmt(t['auc'])} on {t['n']} images" + (" [SYNTHETIC data]" if metrics["synthetic_data"] else "")
    )
    click.echo(f"report in {metrics['report']}")
