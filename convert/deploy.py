"""`leukocam deploy`: send a model bundle to a Pi over ssh, install it there, restart, confirm.

The Pi does the real checking: `leukocam install-bundle` re-verifies the copy
(hash, schema, shapes, golden self-test) and only then makes it current, keeping
the old one as `previous` (device/bundle_store.py). Here we refuse to send a
bundle that already fails `load_bundle`, and afterwards ask the service which
model it runs, so a start-up rollback on the Pi is reported, not hidden.

The ssh and rsync programs come from $LEUKOCAM_SSH / $LEUKOCAM_RSYNC (split
like a shell would), so `LEUKOCAM_SSH="ssh -p 2222"` works and tests can put a
local fake in their place.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import click

from device.bundle import Bundle, load_bundle
from device.bundle_store import DEFAULT_STORE, bundle_id
from device.errors import BundleError, LeukoCamError

HEALTH_URL = "http://127.0.0.1:8080/api/health"


class DeployError(LeukoCamError):
    """A deployment step failed; the message says what state the Pi is in."""


def _program(value: str | None, env: str, default: str) -> list[str]:
    return shlex.split(value if value is not None else os.environ.get(env, default))


def plan(
    bundle_dir: str | Path,
    host: str,
    *,
    remote_dir: str = "/tmp",
    service: str = "leukocam",
    ssh: str | None = None,
    rsync: str | None = None,
    store: str | Path = DEFAULT_STORE,
    remote_leukocam: str = "leukocam",
    health_url: str = HEALTH_URL,
) -> dict[str, list[str]]:
    """The commands of a deployment by step name (copy, install, cleanup, restart, health).

    Raises:
        BundleError: the local bundle fails load_bundle; nothing is sent.
    """
    return _steps(
        _check_local(bundle_dir),
        host,
        remote_dir=remote_dir,
        service=service,
        ssh=ssh,
        rsync=rsync,
        store=store,
        remote_leukocam=remote_leukocam,
        health_url=health_url,
    )


def _check_local(bundle_dir: str | Path) -> Bundle:
    try:
        return load_bundle(bundle_dir)
    except BundleError as exc:
        raise BundleError(f"not deploying, nothing was sent: {exc}") from None


def _steps(
    bundle: Bundle,
    host: str,
    *,
    remote_dir: str,
    service: str,
    ssh: str | None,
    rsync: str | None,
    store: str | Path,
    remote_leukocam: str,
    health_url: str,
) -> dict[str, list[str]]:
    bundle_dir = bundle.path
    ssh_cmd = _program(ssh, "LEUKOCAM_SSH", "ssh")
    rsync_cmd = _program(rsync, "LEUKOCAM_RSYNC", "rsync")
    remote = f"{remote_dir.rstrip('/')}/leukocam-bundle-{bundle_id(bundle_dir)}"
    copy = [*rsync_cmd, "-a", "--delete"]
    if ssh_cmd != ["ssh"]:
        copy += ["-e", shlex.join(ssh_cmd)]
    on_pi = [*ssh_cmd, host]
    return {
        "copy": [*copy, f"{bundle_dir}/", f"{host}:{remote}/"],
        # As the service user, so the store stays writable for a start-up rollback.
        "install": [
            *on_pi,
            "sudo",
            "-u",
            "leukocam",
            *shlex.split(remote_leukocam),
            "install-bundle",
            shlex.quote(remote),
            "--store",
            shlex.quote(str(store)),
        ],
        "cleanup": [*on_pi, "rm", "-rf", shlex.quote(remote)],
        "restart": [*on_pi, "sudo", "systemctl", "restart", shlex.quote(service)],
        "health": [*on_pi, "curl", "-fsS", health_url],
    }


def deploy(
    bundle_dir: str | Path,
    host: str,
    *,
    remote_dir: str = "/tmp",
    service: str = "leukocam",
    ssh: str | None = None,
    rsync: str | None = None,
    dry_run: bool = False,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    store: str | Path = DEFAULT_STORE,
    remote_leukocam: str = "leukocam",
    health_url: str = HEALTH_URL,
    health_tries: int = 10,
    health_delay: float = 2.0,
    echo: Callable[[str], None] = click.echo,
) -> list[list[str]]:
    """Copy, install (the Pi verifies), clean up, restart and confirm over ssh.

    Args:
        ssh, rsync: the programs (default $LEUKOCAM_SSH / $LEUKOCAM_RSYNC, else ssh / rsync).
        dry_run: only return the commands.
        runner: subprocess.run or a stand-in with its signature.

    Returns:
        The commands in order: copy, install, cleanup, restart, health (polled until it answers).

    Raises:
        BundleError: the local bundle is broken (nothing sent).
        DeployError: a step failed; the message says whether anything changed on the Pi.
    """
    bundle = _check_local(bundle_dir)
    steps = _steps(
        bundle,
        host,
        remote_dir=remote_dir,
        service=service,
        ssh=ssh,
        rsync=rsync,
        store=store,
        remote_leukocam=remote_leukocam,
        health_url=health_url,
    )
    commands = list(steps.values())
    if dry_run:
        return commands

    def run(step: str, timeout: float) -> subprocess.CompletedProcess:
        try:
            return runner(steps[step], capture_output=True, text=True, check=False, timeout=timeout)
        except FileNotFoundError as exc:
            raise DeployError(
                f"{exc.filename or steps[step][0]}: not found; install it or set "
                "LEUKOCAM_SSH / LEUKOCAM_RSYNC. Nothing was changed on the Pi"
            ) from None
        except subprocess.TimeoutExpired:
            raise DeployError(f"{step} on {host} timed out after {timeout:.0f} s ({shlex.join(steps[step])})") from None

    echo(f"copying {bundle.path} (sha256 {bundle.sha256[:12]}) to {host} ...")
    done = run("copy", 600)
    if done.returncode != 0:
        raise DeployError(
            f"could not copy the bundle to {host} (rsync exit {done.returncode}: {_tail(done)}); "
            "the Pi is unreachable or refused the login. Nothing was changed on the Pi"
        )
    echo(f"installing on {host} (the Pi checks hash, schema, shapes and runs the self-test) ...")
    done = run("install", 300)
    if done.returncode != 0:
        raise DeployError(f"{host} refused the bundle: {_tail(done)}. The service was not restarted")
    echo(done.stdout.strip())
    run("cleanup", 60)  # a leftover copy in /tmp is harmless; the next deploy reuses the name
    echo(f"restarting {service} on {host} ...")
    done = run("restart", 120)
    if done.returncode != 0:
        raise DeployError(
            f"the bundle is installed on {host}, but `systemctl restart {service}` failed: "
            f"{_tail(done)}. Check `journalctl -u {service}` on the Pi"
        )
    health = _poll_health(run, health_tries, health_delay)
    if health is None:
        raise DeployError(
            f"the bundle is installed on {host} and {service} was restarted, but it did not report "
            f"healthy after {health_tries} tries; check `journalctl -u {service} -n 50` on the Pi"
        )
    model = health.get("model") or {}
    running = str(model.get("sha256", ""))
    if running != bundle.sha256:
        raise DeployError(
            f"{host} runs model sha256 {running[:12] or '?'}, not the deployed {bundle.sha256[:12]}: the service "
            f"refused the new bundle at start-up and rolled back ({model.get('note') or 'see journalctl'})"
        )
    echo(f"{host}: {service} is up with model sha256 {running[:12]} ({model.get('name') or 'unnamed'})")
    return commands


def _poll_health(run: Callable[[str, float], subprocess.CompletedProcess], tries: int, delay: float) -> dict | None:
    for attempt in range(tries):
        done = run("health", 30)
        if done.returncode == 0:
            try:
                return json.loads(done.stdout)
            except ValueError:
                pass
        if attempt + 1 < tries:
            time.sleep(delay)
    return None


def _tail(done: subprocess.CompletedProcess, lines: int = 3) -> str:
    text = (done.stderr or "").strip() or (done.stdout or "").strip() or "no output"
    return " / ".join(text.splitlines()[-lines:])


@click.command("deploy")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", required=True, help="The Pi, as ssh knows it (user@host or an ssh config alias).")
@click.option("--remote-dir", default="/tmp", show_default=True, help="Where the copy lands before install.")
@click.option("--service", default="leukocam", show_default=True, help="systemd unit to restart.")
@click.option("--store", default=str(DEFAULT_STORE), show_default=True, help="Bundle store on the Pi.")
@click.option("--dry-run", is_flag=True, help="Print the commands, run nothing.")
def deploy_command(bundle, host, remote_dir, service, store, dry_run):
    """Copy a model bundle to a Pi, install it (checked there; the old one is kept), restart, confirm."""
    commands = deploy(bundle, host, remote_dir=remote_dir, service=service, store=store, dry_run=dry_run)
    if dry_run:
        for cmd in commands:
            click.echo(shlex.join(cmd))
