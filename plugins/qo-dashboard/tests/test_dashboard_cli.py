"""``qo dashboard`` on the command line: the plugin's hook adds it; safe defaults."""

from __future__ import annotations

from click.testing import CliRunner

from qo.cli import build_cli


def _cli():
    return build_cli()  # qo's root group with every plugin's commands: ours through the entry point


def test_help_lists_the_options():
    result = CliRunner().invoke(_cli(), ["dashboard", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--url", "--queue", "--host", "--port", "--allow-actions", "--auth-token", "--refresh",
                   "--prices", "--insecure-no-auth", "QO_DASHBOARD_TOKEN", "127.0.0.1", "8377"):
        assert option in result.output


def test_non_loopback_host_without_token_is_refused(tmp_path):
    result = CliRunner().invoke(_cli(), ["dashboard", "--host", "0.0.0.0", "--url", str(tmp_path)],
                                env={"QO_DASHBOARD_TOKEN": ""})
    assert result.exit_code == 2
    assert "--host 0.0.0.0 is not a loopback address" in result.output and "--auth-token" in result.output


def test_bad_prices_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(_cli(), ["dashboard", "--prices", "HEAD=1", "--url", str(tmp_path)])
    assert result.exit_code == 2 and "'HEAD' is not one of" in result.output
