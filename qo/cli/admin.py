"""``qo doctor``, ``qo plugins`` and ``qo config``."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from ..doctor import run_checks
from ..plugins import get_plugins
from .common import echo_json, open_queue, queue_options, run


@click.command()
@queue_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object (with --scan: one per unreadable object).")
@click.option("--scan", is_flag=True,
              help="Instead of the checks: read every object of the queue and list those qo cannot read "
                   "(one GET per object: the cost follows the queue's size).")
@run
async def doctor(url: str, queue_name: str, as_json: bool, scan: bool) -> None:
    """Check the backend's CAS semantics and permissions; --scan lists unreadable objects."""
    if scan:
        return await _scan(url, queue_name, as_json)
    async with await open_queue(url, queue_name) as queue:
        checks = await run_checks(queue.storage, base=f"{queue.name}/_doctor")
    healthy = all(c.ok for c in checks if c.required)
    if as_json:
        echo_json({"backend": queue.storage.name, "ok": healthy,
                   "checks": [{"name": c.name, "ok": c.ok, "required": c.required, "detail": c.detail} for c in checks]})
    else:
        click.echo(f"backend: {queue.storage.name} ({queue.storage!r})")
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            click.echo(f"  [{mark}] {c.name}: {c.detail}")
        click.echo("healthy: qo can run on this store" if healthy else "NOT HEALTHY: qo cannot run safely on this store")
    if not healthy:
        sys.exit(1)


async def _scan(url: str, queue_name: str, as_json: bool) -> None:
    from ..scan import scan

    found = 0
    async with await open_queue(url, queue_name) as queue:
        def progress(n: int) -> None:
            if not as_json and n % 10000 == 0:
                click.echo(f"  ... {n} objects read", err=True)

        async for finding in scan(queue, progress=progress):
            found += 1
            if as_json:
                echo_json({"key": finding.key, "reason": finding.reason})
            else:
                click.echo(f"{finding.key}: {finding.reason}")
    if not as_json:
        click.echo(f"{found} unreadable object{'s' if found != 1 else ''} in queue {queue_name or queue.name!r}"
                   + ("; each costs only itself (skipped by workers and commands); delete or fix them by hand"
                      if found else ""), err=True)
    if found:
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def plugins(as_json: bool) -> None:
    """Plugins, their hooks and where they come from; those not loaded, and why."""
    loaded = get_plugins()
    rows = loaded.all_info()
    if as_json:
        echo_json([{"name": i.name, "status": i.status, "distribution": i.distribution, "version": i.version,
                    "source": i.source, "hooks": i.hooks, "error": i.error} for i in rows])
        return
    for i in rows:
        origin = f"{i.distribution} {i.version}" if i.distribution else (i.source or "")
        click.echo(f"{i.name:<14} {i.status:<8} {origin}  ({i.source})")
        if i.hooks:
            click.echo(f"{'':<14} hooks: {', '.join(i.hooks)}")
        if i.error:
            click.echo(f"{'':<14} error: {i.error}")
    schemes = ", ".join(f"{s}://" if s else "bare paths" for s in loaded.schemes())
    click.echo(f"storage schemes: {schemes}")
    out = [i for i in rows if i.status in ("broken", "skipped")]
    if out:
        click.echo(f"not loaded: {len(out)} plugin(s), see error above (QO_STRICT_PLUGINS=1 makes this fatal)")


async def _with_queue_settings(cfg: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the queue's shared settings over them, and those it adds."""
    from ..queue_settings import settings_key

    async with await open_queue(cfg["url"], cfg["queue"]) as queue:
        values = await queue.settings.get(refresh=True)
    source = f"queue settings, {settings_key(queue.name)}"
    out = []
    for row in rows:
        if row["name"] in values:
            row = {**row, "value": values[row["name"]], "source": f"{source}; over {row['value']} ({row['source']})"}
        out.append(row)
    known = {r["name"] for r in rows}
    return out + [{"name": k, "value": v, "source": source} for k, v in values.items() if k not in known]


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per setting.")
@click.option("--url", default=None, help="Show the effect of this flag too.")
@click.option("--queue", "queue_name", default=None, help="Show the effect of this flag too.")
@click.option("--queue-settings", "with_queue", is_flag=True,
              help="Also read the queue's shared settings from its bucket: they go over these.")
def config(as_json: bool, url: str | None, queue_name: str | None, with_queue: bool) -> None:
    """Every setting, its value and where it came from (default < pyproject.toml
    [tool.qo] < qo.toml < environment < flags). The URL is shown redacted.

    The settings a whole queue shares (task defaults, polling, aging) are kept in its
    bucket and go over these: --queue-settings shows them too (see also qo settings)."""
    from ..config import load
    from ..errors import QoError

    try:
        cfg = load().with_flags(url=url, queue=queue_name)
        rows = cfg.rows()
        if with_queue:
            rows = asyncio.run(_with_queue_settings(cfg, rows))
    except QoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for row in rows:
        if as_json:
            echo_json(row)
        else:
            value = ", ".join(row["value"]) if isinstance(row["value"], list) else row["value"]
            click.echo(f"{row['name']:<16} {str(value):<40} ({row['source']})")
