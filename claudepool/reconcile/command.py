"""``claudepool reconcile``: read both sides, compare them, print the differences, exit by the tolerance.

    claudepool reconcile --since 2026-12-01 [--until 2026-12-02] [--config FILE]
                         [--url URL] [--key KEY] [--ledger-file PATH]
                         [--tolerance-usd 0.01] [--tolerance-tokens 0] [--json]

The provider's side needs ``[upstream] base_url`` and ``admin_key`` (or ``admin_key_file``) of the
configuration (``--config``, ``$CLAUDEPOOL_CONFIG``, ``CLAUDEPOOL_UPSTREAM__ADMIN_KEY``). The ledger
is read from the daemon (``--url``, default ``[server] http``; ``--key`` its admin key, default
``$CLAUDEPOOL_KEY``, else ``[server] admin_key`` when written plain), from ``--ledger-file``, or
both (each record once). Exit codes: 0 every day and model within the tolerance, 1 some beyond it,
2 nothing compared (bad arguments or configuration, a side that could not be read).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import orjson

from claudepool.client import AsyncClient
from claudepool.config import load_settings
from claudepool.errors import ConfigError, ReconcileError
from claudepool.reconcile import ledger as ledger_io
from claudepool.reconcile.compare import Reconciliation, Tolerance, compare, ledger_totals, provider_totals
from claudepool.reconcile.provider import AdminApi

EXIT_WITHIN, EXIT_BEYOND, EXIT_NOT_COMPARED = 0, 1, 2


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--since", required=True, help="the first UTC day, YYYY-MM-DD")
    cmd.add_argument("--until", help="the last UTC day, YYYY-MM-DD (default: today)")
    cmd.add_argument("--config", help="TOML config file for [upstream] and [server] (default: $CLAUDEPOOL_CONFIG)")
    cmd.add_argument("--url", help="the daemon's HTTP base URL, for its ledger (default: [server] http)")
    cmd.add_argument("--key", default=os.environ.get("CLAUDEPOOL_KEY"),
                     help="the daemon's admin key ($CLAUDEPOOL_KEY; else [server] admin_key when written plain)")
    cmd.add_argument("--ledger-file", help="read the ledger from this [metering] ledger_file (alone, or with --url)")
    cmd.add_argument("--tolerance-usd", type=float, default=0.01, help="dollars a day and model may differ by")
    cmd.add_argument("--tolerance-tokens", type=int, default=0,
                     help="tokens of each kind a day and model may differ by")
    cmd.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    cmd.add_argument("--connect-timeout", type=float, default=10.0, dest="connect_timeout_s",
                     help="seconds to keep retrying a refused connect to the daemon")


@dataclass(frozen=True)
class Plan:
    first_day: date
    last_day: date
    provider_url: str
    admin_key: str
    daemon_url: str | None
    daemon_key: str | None
    ledger_file: Path | None
    tolerance: Tolerance
    connect_timeout_s: float

    @property
    def starting_at(self) -> datetime:
        return datetime.combine(self.first_day, time(), UTC)

    @property
    def ending_at(self) -> datetime:
        return datetime.combine(self.last_day + timedelta(days=1), time(), UTC)


def run(args: argparse.Namespace) -> int:
    try:
        plan = _plan(args)
    except ConfigError as exc:
        print(f"claudepool reconcile: {exc}", file=sys.stderr)
        return EXIT_NOT_COMPARED
    try:
        result = asyncio.run(reconcile(plan))
    except ReconcileError as exc:
        print(f"claudepool reconcile: {exc}", file=sys.stderr)
        return EXIT_NOT_COMPARED
    print(orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2).decode() if args.json else result.as_text())
    return EXIT_WITHIN if result.within_tolerance else EXIT_BEYOND


async def reconcile(plan: Plan) -> Reconciliation:
    """Read the ledger and the provider's reports for the plan's days, and compare them."""
    sources: list[list[ledger_io.LedgerRecord]] = []
    where: list[str] = []
    if plan.daemon_url is not None:
        assert plan.daemon_key is not None
        async with AsyncClient(key=plan.daemon_key, url=plan.daemon_url,
                               connect_timeout_s=plan.connect_timeout_s) as client:
            sources.append(await ledger_io.read_daemon(client, plan.starting_at.timestamp()))
        where.append(f"{plan.daemon_url}/v1/ledger")
    if plan.ledger_file is not None:
        sources.append(ledger_io.read_file(plan.ledger_file))
        where.append(str(plan.ledger_file))
    records = ledger_io.merged(*sources)
    async with AdminApi(plan.provider_url, plan.admin_key) as api:
        usage = await api.usage(plan.starting_at, plan.ending_at)
        cost = await api.cost(plan.starting_at, plan.ending_at)
    in_range = [r for r in records if plan.starting_at.timestamp() <= r.started_at < plan.ending_at.timestamp()]
    return Reconciliation(
        plan.first_day, plan.last_day,
        compare(ledger_totals(records, plan.first_day, plan.last_day), provider_totals(usage, cost)),
        plan.tolerance, " and ".join(where), plan.provider_url,
        turn_records=sum(1 for r in in_range if r.kind != "call"))


def _plan(args: argparse.Namespace) -> Plan:
    first_day = _day(args.since, "--since")
    last_day = _day(args.until, "--until") if args.until else datetime.now(UTC).date()
    if last_day < first_day:
        raise ConfigError(f"--until {last_day} is before --since {first_day}")
    if args.tolerance_usd < 0 or args.tolerance_tokens < 0:
        raise ConfigError("the tolerances may not be negative")
    settings = load_settings(args.config)
    admin_key = settings.upstream.admin_credential()
    if admin_key is None:
        raise ConfigError("the provider's usage and cost reports need the organisation's Admin API key: set "
                          "[upstream] admin_key or admin_key_file (or $CLAUDEPOOL_UPSTREAM__ADMIN_KEY)")
    daemon_url = args.url
    if daemon_url is None and args.ledger_file is None:
        if not settings.server.http:
            raise ConfigError("no ledger to read: give --url or --ledger-file ([server] http is off)")
        host, port = settings.server.http_host_port()
        daemon_url = f"http://{host}:{port}"
    daemon_key = args.key
    configured = settings.server.admin_key.get_secret_value()
    if daemon_url is not None and not daemon_key:
        if not configured or configured.startswith("sha256:"):
            raise ConfigError("the daemon's ledger needs its admin key: --key or $CLAUDEPOOL_KEY")
        daemon_key = configured
    return Plan(first_day, last_day, settings.upstream.base_url, admin_key, daemon_url, daemon_key,
                Path(args.ledger_file) if args.ledger_file else None,
                Tolerance(usd=args.tolerance_usd, tokens=args.tolerance_tokens), args.connect_timeout_s)


def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option}: expected a UTC day YYYY-MM-DD, got {text!r}") from None
