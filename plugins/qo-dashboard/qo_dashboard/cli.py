"""``qo dashboard``: serve the dashboard of one queue until interrupted."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from qo import redact_url
from qo.cli.common import queue_options, run
from qo.counting import CountingStorage

from .costs import PriceError, parse_prices
from .hosts import BadHostName, normalise
from .security import is_loopback


def _prices(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float]:
    try:
        return parse_prices(value)
    except PriceError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _hosts(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(normalise(name) for name in value)
    except BadHostName as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --auth-token (or --insecure-no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8377, show_default=True, help="Port to bind.")
@click.option("--allow-actions", is_flag=True,
              help="Allow retry, cancel, pause, resume and trigger (default: read-only).")
@click.option("--auth-token", envvar="QO_DASHBOARD_TOKEN", default=None, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' or a login with it (env QO_DASHBOARD_TOKEN).")
@click.option("--insecure-no-auth", is_flag=True,
              help="Allow a non-loopback --host without an auth token (anyone who reaches it sees the queue).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, callback=_hosts, metavar="NAME",
              help="Another host name the dashboard answers to (repeatable), e.g. the name a reverse proxy "
                   "or /etc/hosts gives it. Besides these it answers only to the --host address "
                   "(and localhost when that is loopback); other Host: headers get 421.")
@click.option("--refresh", type=click.FloatRange(1.0, 3600.0), default=5.0, show_default=True, metavar="SECONDS",
              help="How often the overview refreshes itself.")
@click.option("--prices", envvar="QO_DASHBOARD_PRICES", default=None, callback=_prices, metavar="OP=USD,...",
              help="Request prices in USD per 1,000 for the cost meter, e.g. PUT=0.005,GET=0.0004 "
                   "(env QO_DASHBOARD_PRICES; default: S3 Standard's published prices).")
@queue_options
@click.pass_context
def dashboard(ctx: click.Context, host: str, port: int, allow_actions: bool, auth_token: str | None,
              insecure_no_auth: bool, allowed_hosts: tuple[str, ...], refresh: float, prices: dict[str, float],
              url: str | None, queue_name: str | None) -> None:
    """Serve a web dashboard of the queue: overview, tasks, dead letters, schedules,
    limits and a cost meter. Read-only unless --allow-actions; binds 127.0.0.1."""
    if not is_loopback(host) and not auth_token and not insecure_no_auth:
        raise click.UsageError(f"--host {host} is not a loopback address: give --auth-token TOKEN (or "
                               "QO_DASHBOARD_TOKEN), or --insecure-no-auth to serve it to anyone who can reach it",
                               ctx=ctx)
    try:
        normalise(host)
    except BadHostName as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="--host") from None
    try:
        _serve(host, port, allow_actions, auth_token, allowed_hosts, refresh, prices, url, queue_name)
    except KeyboardInterrupt:  # before the handlers were installed
        click.echo("stopped", err=True)


@run
async def _serve(host: str, port: int, allow_actions: bool, auth_token: str | None, allowed_hosts: tuple[str, ...],
                 refresh: float, prices: dict[str, float], url: str | None, queue_name: str | None) -> None:
    from aiohttp import web

    import qo

    from . import serverlog
    from .app import create_app

    queue = await qo.connect(url, queue=queue_name, wrap_storage=CountingStorage)
    app = create_app(queue, allow_actions=allow_actions, auth_token=auth_token, refresh=refresh, prices=prices,
                     bind=host, allowed_hosts=allowed_hosts)
    runner = web.AppRunner(app, access_log=None, logger=serverlog.configure())
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            click.echo(f"error: cannot serve on {host}:{port}: {exc.strerror or exc}", err=True)
            sys.exit(1)
        shown = f"[{host}]" if ":" in host else host
        port = runner.addresses[0][1] if runner.addresses else port  # the one chosen for --port 0
        click.echo(f"qo dashboard of queue {queue.name!r} at {redact_url(str(queue.url))}: "
                   f"http://{shown}:{port}/  ({'actions allowed' if allow_actions else 'read-only'}"
                   f"{', auth token required' if auth_token else ''}; Ctrl-C stops)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass
        try:
            await stop.wait()
        except asyncio.CancelledError:
            pass
        click.echo("stopped", err=True)
    finally:
        await runner.cleanup()
        await queue.close()
