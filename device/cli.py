"""The `leukocam` command line: one entry point, subcommands.

Device commands live here. Workstation commands (synth, train, convert,
demo-model) are registered by name and imported only when invoked, so
`leukocam serve` on a Pi never imports `training`, `convert` or TensorFlow.
A user mistake ends in a one-line message and exit code 2, not a stack trace.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import signal
import socket
import sys
import threading

import click

from device.cli_base import ReportingGroup
from device.config import CONFIG_ENV, SYSTEM_CONFIG, resolve_config_path

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
    "pi-bench": ("device.pi_bench:pi_bench_command", "Pipeline stages and peak RSS against the Pi's budgets."),
}


class LazyGroup(ReportingGroup):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            target, _ = LAZY_COMMANDS[name]
            module, attr = target.split(":")
            try:
                command = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                raise click.ClickException(
                    f"`leukocam {name}` needs the workstation extras ({exc.name} is missing): "
                    "pip install 'leukocam[train]' (or run `make install-train`)"
                ) from None
            return _with_config_discovery(command)
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


CONFIG_HELP = (
    f"TOML config. Default: the file named by ${CONFIG_ENV}, else {SYSTEM_CONFIG} when it exists, "
    "else the embedded demo configuration."
)

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help=CONFIG_HELP)


def _discovered_config_path(_ctx, _param, value):
    """A click callback: the --config value after discovery (`device.config.resolve_config_path`)."""
    path, _ = resolve_config_path(value)
    return None if path is None else str(path)


def _with_config_discovery(command):
    """Give a lazily registered command's own --config (`leukocam doctor`) the shared discovery order.

    Commands defined in other modules declare their --config themselves; this makes the value that reaches
    them the discovered one, so every command that takes a config finds the same file.
    """
    for param in command.params:
        if param.name == "config_path" and param.callback is None:
            param.callback = _discovered_config_path
            param.help = CONFIG_HELP
    return command


def load_cli_config(config_path):
    """The config for a command: its --config, else the shared discovery order; logs which file and why."""
    from device.config import discover_config

    cfg, how = discover_config(config_path)
    logging.getLogger("leukocam").info("config: %s (%s)", cfg.source, how)
    return cfg


def _listen_error(exc: OSError, host: str, port: int, cfg) -> Exception:
    """One line for a socket the dashboard cannot listen on, or `exc` itself when it is something else."""
    from device.config import EMBEDDED
    from device.errors import ConfigError

    in_file = f" in {cfg.source}" if cfg.source != EMBEDDED else ""
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"port {port} on {host} is already in use (another `leukocam serve`, or another program, listens "
            f"there): stop that, or choose another port with `--port N` or [web] port{in_file}"
        )
    if exc.errno == errno.EACCES:
        return ConfigError(
            f"port {port} on {host}: permission denied (ports below 1024 need root); "
            f"choose a port from 1024 up with `--port N` or [web] port{in_file}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"cannot listen on {host}: it is not an address of this machine; set [web] host{in_file} "
            "to 127.0.0.1 (this machine only), 0.0.0.0 (the whole lab network) or one of this machine's addresses"
        )
    if isinstance(exc, socket.gaierror):
        return ConfigError(
            f"[web] host {host!r}{in_file}: the name does not resolve to an address ({exc.strerror}); "
            "use an IP address such as 127.0.0.1 or 0.0.0.0"
        )
    return exc


def _check_can_listen(host: str, port: int, cfg) -> None:
    """Bind (and let go of) every address the dashboard will listen on, as waitress will, before anything starts.

    A second `leukocam serve` must stop here, with one line naming the port, before it opens the camera or
    runs start-up repairs on the store the first one is using.
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(
            name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            with socket.socket(family, kind, proto) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress does: TIME_WAIT is no clash
                probe.bind(address)
    except OSError as exc:
        problem = _listen_error(exc, host, port, cfg)
        if problem is not exc:
            raise problem from None
        # anything else: waitress meets it too and reports it


@cli.command()
@config_option
@click.option("--host", default=None, help="Override [web] host.")
@click.option("--port", type=int, default=None, help="Override [web] port.")
def serve(config_path, host, port):
    """Run the appliance: capture worker and dashboard in one process."""
    import dataclasses

    from device import sdnotify
    from device.bundle_store import precheck_bundle
    from device.config import discover_config
    from device.service import Appliance
    from device.web import create_app
    from device.web.server import make_server

    cfg, how = discover_config(config_path)
    if host or port is not None:
        cfg = dataclasses.replace(
            cfg,
            web=dataclasses.replace(cfg.web, host=host or cfg.web.host, port=cfg.web.port if port is None else port),
        )
        cfg.validate()
    precheck_bundle(cfg.bundle_path)  # a broken bundle is refused before the data store is opened
    _check_can_listen(cfg.web.host, cfg.web.port, cfg)  # a second serve stops here, before the camera and store
    log = logging.getLogger("leukocam")
    log.info("config: %s (%s)", cfg.source, how)
    from device.accounts import load_users, login_required_for

    if login_required_for(cfg.web.host, cfg.web.login) and not load_users(cfg.store.data_dir):
        log.warning(
            "dashboard on %s requires a login but no account exists: run `%s`",
            cfg.web.host,
            cfg.command("set-password", "USER"),
        )
    # "Task queue depth is N" means requests waited for a free worker thread: normal when a browser loads a
    # page's images at once, so only errors of that logger reach the journal.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    appliance = Appliance(cfg)
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
    try:
        server = make_server(app, cfg.web)
    except OSError as exc:  # the port was taken after the check above
        appliance.stop()
        problem = _listen_error(exc, cfg.web.host, cfg.web.port, cfg)
        if problem is exc:
            raise
        raise problem from None
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


def capture_summary(result: dict) -> str:
    """One line for a capture result: id, status, cells, blasts and the message (`leukocam capture`)."""
    outcome, cap = result["outcome"], result.get("capture") or {}
    if cap.get("id") is None:
        return f"capture {outcome['status']}: {outcome['message']}"
    cells = cap.get("cells") or []
    n = cap.get("n_cells", len(cells))
    blasts = sum(c.get("label") == "blast" for c in cells)
    review = sum(bool(c.get("needs_review")) for c in cells)
    parts = [
        f"capture {cap['id']}",
        f"slide {cap['slide_id']}" if cap.get("slide_id") else None,
        str(cap.get("status", outcome["status"])),
        f"{n} cell{'' if n == 1 else 's'}",
        f"{blasts} blast{'' if blasts == 1 else 's'}",
        f"{review} to review" if review else None,
    ]
    line = ", ".join(p for p in parts if p) + f": {cap.get('message', outcome['message'])}"
    return line + (" [SYNTHETIC demo model: not clinical]" if cap.get("model_synthetic") else "")


@cli.command()
@config_option
@click.argument("image", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--single-cell", is_flag=True, help="The image is one cell (C-NMC style), not a field.")
@click.option("--json/--summary", "as_json", default=False, help="The full result as JSON (default: one summary line).")
def capture(config_path, image, single_cell, as_json):
    """Capture one field (or analyse IMAGE), store it and print the result.

    When `leukocam serve` is running it owns the camera, so the capture is asked of it
    (the same as the dashboard's Capture button); otherwise the camera is opened here.
    It prints one line (capture id, status, cells, blasts, message); --json prints the whole
    stored result for scripts.
    """
    from device.service import Appliance

    cfg = load_cli_config(config_path)
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
    click.echo(json.dumps(result, indent=2, default=str) if as_json else capture_summary(result))
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
    from device.web.sessions import DB_FILE, SessionRegistry

    cfg = load_cli_config(config_path)
    try:
        path = write_password(cfg.store.data_dir, username, password)
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    ended = 0
    if (path.parent / DB_FILE).is_file():  # a changed password logs that user out everywhere
        ended = SessionRegistry(path.parent).end_user(username)
    click.echo(
        f"password for {username!r} stored (scrypt hash, mode 0600) in {path} ([store] data_dir of {cfg.source}); "
        "no restart needed" + (f"; {ended} open session(s) of {username!r} ended" if ended else "")
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
    from device.imaging import decode_image
    from device.quality import assess, suggest_thresholds

    cfg = load_cli_config(config_path)
    um = cfg.finder.um_per_px or None
    reports = []
    for path in fields:
        rgb = decode_image(path)
        r = assess(working_copy(rgb, um) if um else rgb, min_focus=0.0, max_clipped_fraction=1.0)
        click.echo(
            f"{path}: sharpness {r.focus:.1f}, clipped {r.clipped_fraction:.4f}, brightness {r.mean_brightness:.0f}"
        )
        reports.append(r)
    t = suggest_thresholds(reports)
    click.echo(f"\n# paste into the [quality] section of {_config_file_name(cfg.source)}")
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
            click.echo(f"skipped: {exc}")  # the message names the file
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
    click.echo(f"\n# paste into the [finder] section of {_config_file_name(resolve_config_path(None)[0])}")
    click.echo(f"[finder]\num_per_px = {median:.4f}")


def _config_file_name(source) -> str:
    """The config file to edit, for "paste into" lines: the one in use, or a generic name for the embedded default."""
    from device.config import EMBEDDED

    return "leukocam.toml (your config file)" if source in (None, EMBEDDED) else str(source)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
