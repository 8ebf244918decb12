"""The ``qo`` command line: core commands, then whatever plugins add."""

from __future__ import annotations

import click

from ..errors import QoError
from ..plugins import get_plugins
from .admin import config, doctor, plugins
from .layout import layout
from .limits import limit
from .purge import purge
from .schedule import schedule
from .settings import settings
from .stats import stats
from .submit_many import submit_many
from .tasks import cancel, list_tasks, retry, status, submit, submit_graph
from .worker import worker


@click.group()
@click.version_option(package_name="qo-queue")
def cli() -> None:
    """qo: a distributed task queue that needs nothing but a bucket."""


cli.add_command(submit)
cli.add_command(submit_graph)
cli.add_command(submit_many)
cli.add_command(status)
cli.add_command(list_tasks)
cli.add_command(stats)
cli.add_command(purge)
cli.add_command(cancel)
cli.add_command(retry)
cli.add_command(worker)
cli.add_command(schedule)
cli.add_command(limit)
cli.add_command(settings)
cli.add_command(layout)
cli.add_command(doctor)
cli.add_command(plugins)
cli.add_command(config)


def build_cli() -> click.Group:
    """The root group with every plugin's commands attached (after the core ones)."""
    get_plugins().hook.qo_cli_commands(cli=cli)
    return cli


def main() -> None:
    try:
        root = build_cli()
    except QoError as exc:  # e.g. a typo in qo.toml: one line, exit 1
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    root(prog_name="qo")
