"""The click group every LeukoCam command line uses (kept out of device.errors, which has no CLI)."""

import sys

import click

from device.errors import LeukoCamError


class ReportingGroup(click.Group):
    """A click group that turns a LeukoCamError into one line on stderr and exit code 2, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LeukoCamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
