"""The `leukocam` command line: one entry point, subcommands.

Device commands live here. Workstation commands (synth, train, convert,
demo-model) are registered by name and imported only when invoked, so
`leukocam serve` on a Pi never imports `training`, `convert` or TensorFlow.
A user mistake ends in a one-line message and exit code 2, not a stack trace.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys
import threading

import click

from device.cli_base import ReportingGroup

# name -> ("module:attribute", short help). Imported on first use.
LAZY_COMMANDS = {
    "synth": ("training.cli:synth", "Generate SYNTHETIC single-cell datasets and smear fields."),
    "train": ("training.cli:train", "Train the classifier on a folder dataset (needs the [train] extra)."),
    "data": ("training.cli:data", "Inspect a dataset: classes, subjects, sizes, duplicates, unreadable files."),
    "cv": ("training.cli:cv", "Subject-grouped k-fold cross-validation (folds.csv, mean +- sd)."),
    "evaluate": ("training.cli:evaluate", "Report (metrics, plots, Grad-CAM) for a trained model on its test split."),
    "convert": ("convert.cli:convert", "Convert a trained Keras model into a verified model bundle."),
    "verify": ("convert.cli:verify", "Check a bundle against its float model with the device's classifier."),
    "bench": ("convert.cli:bench", "Benchmark model sizes and latencies in one run (markdown + JSON)."),
    "demo-model": ("convert.demo:demo_model", "Rebuild the shipped synthetic demo bundle and sample fields."),
    "deploy": ("convert.deploy:deploy_command", "Copy a model bundle to a Pi over ssh, install it there, restart."),
    "install-bundle": (
        "device.bundle_store:install_bundle_command",
        "Check a bundle on this device and make it current (the old one is kept).",
    ),
    "rollback-bundle": ("device.bundle_store:rollback_bundle_command", "Switch back to the previous model bundle."),
    "list-bundles": ("device.bundle_store:list_bundles_command", "List installed model bundles and their roles."),
    "finder-eval": (
        "training.finder_eval:finder_eval_command",
        "Score the white-cell finder per stress condition; crop gallery beside training cells.",
    ),
    "doctor": ("device.doctor:doctor", "Check camera, GPIO, runtime, model bundle, disk and clock; say what to fix."),
}


class LazyGroup(ReportingGroup):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            target, _ = LAZY_COMMANDS[name]
            module, attr = target.split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                raise click.ClickException(
                    f"`leukocam {name}` needs the workstation extras ({exc.name} is missing): "
                    "pip install 'leukocam[train]' (or run `make install-train`)"
                ) from None
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                rows.append((name, super().get_command(ctx, name).get_short_help_str(80)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """LeukoCam: white-cell screening at the microscope (research use only, not a diagnosis)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config (default: the embedded demo configuration).",
)


@cli.command()
@config_option
@click.option("--host", default=None, help="Override [web] host.")
@click.option("--port", type=int, default=None, help="Override [web] port.")
def serve(config_path, host, port):
    """Run the appliance: capture worker and dashboard in one process."""
    import dataclasses

    from device import sdnotify
    from device.bundle_store import precheck_bundle
    from device.config import load_config
    from device.service import Appliance
    from device.web import create_app
    from device.web.server import make_server

    cfg = load_config(config_path)
    if host or port is not None:
        cfg = dataclasses.replace(
            cfg,
            web=dataclasses.replace(cfg.web, host=host or cfg.web.host, port=cfg.web.port if port is None else port),
        )
        cfg.validate()
    precheck_bundle(cfg.bundle_path)  # a broken bundle is refused before the data store is opened
    log = logging.getLogger("leukocam")
    from device.accounts import load_users, login_required_for

    if login_required_for(cfg.web.host, cfg.web.login) and not load_users(cfg.store.data_dir):
        log.warning(
            "dashboard on %s requires a login but no account exists: run `leukocam set-password USER`", cfg.web.host
        )
    appliance = Appliance(cfg)
    log.info("config: %s", cfg.source)
    log.info(
        "model: %s (sha256 %s, %s%s)",
        appliance.bundle.path,
        appliance.bundle.sha256[:12],
        appliance.classifier.runtime,
        ", SYNTHETIC demo model, not clinical" if appliance.bundle.synthetic else "",
    )
    if appliance.self_test:
        log.info(appliance.self_test.message)
    log.info(appliance.reconcile.summary())
    app = create_app(appliance)
    server = make_server(app, cfg.web)
    stopping = threading.Event()

    def shutdown(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            sdnotify.stopping()
            log.info("signal %d: stopping", signum)
            server.close()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    appliance.start()
    port = server.effective_port  # create_server has already bound and is listening

    def healthy() -> bool:  # on the watchdog thread, every WatchdogSec/2: worker alive and HTTP answering
        return appliance.worker_alive and sdnotify.http_answers(cfg.web.host, port)

    watchdog = sdnotify.Watchdog(healthy).start()  # no-op unless systemd set WATCHDOG_USEC
    sdnotify.ready(f"dashboard on http://{cfg.web.host}:{port}/")
    log.info("dashboard on http://%s:%s/", cfg.web.host, port)
    try:
        server.run()
    except OSError:
        if not stopping.is_set():
            raise
    finally:
        watchdog.stop()
        appliance.stop()
        log.info("stopped cleanly")


def _capture_via_service(cfg, timeout: float = 120.0) -> dict | None:
    """Ask a running `leukocam serve` to capture (it owns the camera). None when no service answers."""
    import time
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if cfg.web.host in ("0.0.0.0", "::", "") else cfg.web.host
    base = f"http://{host}:{cfg.web.port}"

    def get(path: str) -> dict:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return json.load(r)

    try:
        before = get("/api/captures?limit=1")
    except (urllib.error.URLError, OSError):
        return None
    last_id = before["captures"][0]["id"] if before["captures"] else 0
    try:
        urllib.request.urlopen(
            urllib.request.Request(
                base + "/api/capture",
                method="POST",
                data=b'{"trigger": "cli"}',
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        )
    except urllib.error.HTTPError as exc:
        raise click.ClickException(json.loads(exc.read() or b"{}").get("error", str(exc))) from None
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = get("/api/captures?limit=1")["captures"]
        if latest and latest[0]["id"] > last_id:
            return {
                "outcome": {
                    "capture_id": latest[0]["id"],
                    "status": latest[0]["status"],
                    "message": latest[0]["message"],
                },
                "capture": get(f"/api/captures/{latest[0]['id']}"),
            }
        health = get("/api/health")
        if not health["busy"] and health.get("last_outcome") and health["last_outcome"]["status"] == "error":
            return {"outcome": health["last_outcome"], "capture": None}
        time.sleep(0.3)
    raise click.ClickException(f"the service at {base} did not report a result within {timeout:.0f} s")


@cli.command()
@config_option
@click.argument("image", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--single-cell", is_flag=True, help="The image is one cell (C-NMC style), not a field.")
def capture(config_path, image, single_cell):
    """Capture one field (or analyse IMAGE), store it and print the result as JSON.

    When `leukocam serve` is running it owns the camera, so the capture is asked of it
    (the same as the dashboard's Capture button); otherwise the camera is opened here.
    """
    from device.config import load_config
    from device.service import Appliance

    cfg = load_config(config_path)
    result = None if image else _capture_via_service(cfg)
    if result is None:
        with Appliance(cfg) as appliance:
            if image:
                with open(image, "rb") as fh:
                    outcome = appliance.analyse_upload(fh.read(), image, single_cell=single_cell)
            else:
                outcome = appliance.capture_now("cli")
            result = {
                "outcome": outcome.__dict__,
                "capture": appliance.store.get_capture(outcome.capture_id) if outcome.capture_id else None,
            }
    click.echo(json.dumps(result, indent=2, default=str))
    if result["outcome"]["status"] == "error":
        sys.exit(1)


@cli.command("check-bundle")
@click.argument("bundle", type=click.Path())
def check_bundle(bundle):
    """Load a model bundle, check its hash and shapes, and run its self-test."""
    from device.bundle import load_bundle
    from device.classifier import Classifier

    b = load_bundle(bundle)
    with Classifier(b) as clf:
        result = clf.self_test()
    click.echo(
        f"{b.path}: schema {b.info.schema_version}, sha256 {b.sha256[:12]}, input {b.info.input_size} px, "
        f"{b.info.quantization.mode}, runtime {clf.runtime}"
    )
    click.echo(result.message)
    if not result.passed:
        sys.exit(1)


@cli.command("set-password")
@config_option
@click.argument("username")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="LEUKOCAM_PASSWORD",
    help="Prompted for when not given (env LEUKOCAM_PASSWORD also works).",
)
def set_password(config_path, username, password):
    """Create or change a dashboard login (required when [web] host is not 127.0.0.1)."""
    from device.accounts import AuthError
    from device.accounts import set_password as write_password
    from device.config import load_config
    from device.web.sessions import DB_FILE, SessionRegistry

    cfg = load_config(config_path)
    try:
        path = write_password(cfg.store.data_dir, username, password)
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    ended = 0
    if (path.parent / DB_FILE).is_file():  # a changed password logs that user out everywhere
        ended = SessionRegistry(path.parent).end_user(username)
    click.echo(
        f"password for {username!r} stored (scrypt hash, mode 0600) in {path}; no restart needed"
        + (f"; {ended} open session(s) of {username!r} ended" if ended else "")
    )


@cli.command("calibrate-qc")
@config_option
@click.argument("fields", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def calibrate_qc(config_path, fields):
    """Suggest [quality] thresholds from a few FIELDS you judge good (in focus, well exposed).

    With a calibrated pixel size ([finder] um_per_px) sharpness is measured on the finder's
    working copy, exactly as each capture measures it: calibrate the pixel size first.
    """
    from device.cells import working_copy
    from device.config import load_config
    from device.imaging import decode_image
    from device.quality import assess, suggest_thresholds

    um = load_config(config_path).finder.um_per_px or None
    reports = []
    for path in fields:
        rgb = decode_image(path)
        r = assess(working_copy(rgb, um) if um else rgb, min_focus=0.0, max_clipped_fraction=1.0)
        click.echo(
            f"{path}: sharpness {r.focus:.1f}, clipped {r.clipped_fraction:.4f}, brightness {r.mean_brightness:.0f}"
        )
        reports.append(r)
    t = suggest_thresholds(reports)
    click.echo("\n# paste into the [quality] section of leukocam.toml")
    click.echo(f"[quality]\nmin_focus = {t['min_focus']}\nmax_clipped_fraction = {t['max_clipped_fraction']}")


@cli.command()
@click.argument("fields", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def calibrate(fields):
    """Measure the pixel size (µm/px) from the red cells of a few FIELDS taken with one objective and camera.

    Pixel size belongs to the optics: measure it once per objective, paste the value into
    [finder] um_per_px, and each capture then only checks it cheaply.
    """
    import statistics

    from device.cells import estimate_um_per_px
    from device.errors import ImageError
    from device.imaging import decode_image

    values = []
    for path in fields:
        try:
            value = estimate_um_per_px(decode_image(path))
        except ImageError as exc:
            click.echo(f"{path}: skipped ({exc})")
            continue
        click.echo(
            f"{path}: "
            + (f"{value:.4f} µm/px" if value else "the red cells cannot tell (packed, empty or a single cell)")
        )
        if value:
            values.append(value)
    if not values:
        raise click.ClickException(
            "no field gave a pixel size: use fields with separate red cells and some glass between them, "
            "or measure a stage micrometer and set [finder] um_per_px by hand"
        )
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if len(values) > 1 else 0.0
    click.echo(f"\n{len(values)} of {len(fields)} fields measured; median {median:.4f} µm/px, range ±{spread / 2:.0%}")
    if len(values) < 3:
        click.echo("fewer than 3 fields measured: add more fields for a steadier value")
    click.echo("\n# paste into the [finder] section of leukocam.toml")
    click.echo(f"[finder]\num_per_px = {median:.4f}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
