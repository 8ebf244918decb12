"""The hook implementation: ``qo dashboard`` joins the command line."""

from __future__ import annotations

import click

import qo


@qo.hookimpl
def qo_cli_commands(cli: click.Group) -> None:
    from .cli import dashboard

    if "dashboard" not in cli.commands:  # the CLI may be built more than once
        cli.add_command(dashboard)
