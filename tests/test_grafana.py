"""The Grafana dashboard and the Prometheus alert rules in grafana/: well formed, valid PromQL, and only
about metrics (and label values) that a real daemon exports.

Metric names are the identifiers matching ``claudepool_[a-z0-9_]+`` in the dashboard's queries (panel
targets and template variables) and the rules' ``expr``. The one other metric allowed anywhere is
Prometheus' own ``up``, in the ClaudepoolDaemonDown rule (``up{job="claudepool"} == 0``): a daemon
that is down cannot report it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import spend, until

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]

GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "claudepool-dashboard.json"
ALERTS = GRAFANA / "alerts.yml"
ALERTS_TEST = GRAFANA / "alerts_test.yml"

ROWS: dict[str, set[str]] = {
    "Pool": {"Workers by state vs max workers", "Pool utilisation", "Queue depth by priority", "Queue wait",
             "Rejections per second by kind", "Worker exits per minute by reason", "Boot breaker",
             "Spawn time p95"},
    "Memory": {"PSS per worker slot", "Workers PSS vs memory budget", "Daemon RSS", "Available memory"},
    "Throughput": {"Requests per second by outcome", "Request duration", "Time to first token",
                   "Tokens per second by type", "In flight", "Upstream retries and errors by status"},
    "Tenants": {"Top tenants by cost per hour", "Tokens per second per tenant", "Rejections per second per tenant",
                "Budget left today"},
    "Store": {"Store backend", "Store up", "Store errors per second by operation", "Store operation latency p95",
              "Rate-limit fallbacks", "Metering backlog"},
    "Sessions": {"Active sessions", "Session events per minute", "Transcript disk use"},
    "Gateway": {"Model calls per second by outcome", "Gateway refusals per second by reason",
                "Model call duration p95", "Provider account rate-limit utilisation",
                "Provider 429 and 529 per second by account", "Model fallbacks per minute by profile"},
    "Sandbox": {"Egress refusals per second by reason", "Egress connections per second by kind",
                "Egress throughput by direction", "Workers closed by a sandbox bound per minute"},
}
# A sandboxed profile allowed one outbound host (never spawned): the egress series exist for it alone.
AGENT = {"agent": {"tools": ["Bash"], "allowed_hosts": ["example.com"], "min_idle": 0}}
TEMPLATE_VARIABLES = ("profile", "tenant")
# Allowed metrics that are not claudepool's: Prometheus' scrape health, for the daemon-down alert only.
FOREIGN_METRICS_IN_RULES = {"up"}

METRIC = re.compile(r"claudepool_[a-z0-9_]+")
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")
SELECTOR = re.compile(r"(claudepool_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}
# Labels every scraped series has, whatever the daemon exports.
TARGET_LABELS = {"job", "instance"}
VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")

GAMMA_KEY = "gamma-key-0123"
TENANT_KEYS = {**KEYS, "gamma": GAMMA_KEY}
FAKE_PRICING = {"default": {"input_per_mtok": 3, "output_per_mtok": 15, "cache_read_per_mtok": 0.3,
                            "cache_write_per_mtok": 3.75}}


# -- reading the files ------------------------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def rows(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each row's title and its panels: nested in a collapsed row, else the panels that follow it."""
    found: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = found.setdefault(panel["title"], list(panel.get("panels", [])))
        else:
            assert current is not None, f"panel {panel.get('title')!r} is outside any row"
            current.append(panel)
    return found


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[int, int, str]]:
    """(panel id, target index, expr) for every panel target."""
    return [(panel["id"], i, target["expr"]) for panel in panels(dashboard)
            for i, target in enumerate(panel.get("targets", []))]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    queries: list[str] = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [expr for _, _, expr in panel_exprs(dashboard)] + variable_queries(dashboard)


def alert_exprs(text: str) -> list[str]:
    """The ``expr`` of every rule in a rules file (no YAML library: single-line values and ``|`` blocks)."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if match is None:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value in ("|", "|-", ">", ">-"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        elif value[:1] in "'\"":
            value = value[1:-1]
        exprs.append(value)
    return exprs


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def foreign_metrics(expr: str) -> set[str]:
    """Metric names in ``expr`` that are not claudepool's: identifiers that are neither functions,
    keywords, label names nor parts of strings, durations or numbers."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = GROUPING.sub("", bare)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", bare):
        name = match.group(1)
        if name.lower() not in PROMQL_WORDS and not name.startswith("claudepool_"):
            names.add(name)
    return names


def promql_for_promtool(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced: intervals by 5m, our variables by ``.*``."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    expr = VARIABLE.sub(lambda m: ".*" if m.group(1) in TEMPLATE_VARIABLES else m.group(0), expr)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# -- the dashboard ----------------------------------------------------------------------------------


def test_dashboard_is_importable_offline() -> None:
    text = DASHBOARD.read_text()
    dashboard = load_dashboard()
    assert dashboard["uid"] == "claudepool-overview"
    assert dashboard["title"] == "claudepool"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "__inputs" not in dashboard
    assert "${DS_" not in text
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in TEMPLATE_VARIABLES:
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["multi"] is True
        assert variable["includeAll"] is True
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        assert re.fullmatch(rf"label_values\(claudepool_[a-z0-9_]+, {name}\)", query), query


def test_dashboard_rows_panels_and_datasources() -> None:
    dashboard = load_dashboard()
    found = rows(dashboard)
    for title, expected in ROWS.items():
        assert title in found, f"row {title!r} is missing"
        missing = expected - {panel["title"] for panel in found[title]}
        assert not missing, f"row {title!r} lacks {sorted(missing)}"
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] if row["type"] == "row" for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("targets"), f"{where} has no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{where} has an empty expr"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"


def test_dashboard_variables_are_used_as_regex_matchers() -> None:
    """A multi-value, include-All variable expands to a regex: it only works after ``=~``."""
    for panel_id, _, expr in panel_exprs(load_dashboard()):
        for match in VARIABLE.finditer(expr):
            if match.group(1) in TEMPLATE_VARIABLES:
                assert re.search(rf'=~\s*"{re.escape(match.group(0))}"', expr), (panel_id, expr)


def test_alert_rules_use_only_claudepool_metrics_and_up() -> None:
    exprs = alert_exprs(ALERTS.read_text())
    assert len(exprs) == ALERTS.read_text().count("- alert:") >= 8
    foreign = set().union(*(foreign_metrics(expr) for expr in exprs))
    assert foreign == FOREIGN_METRICS_IN_RULES
    for _, _, expr in panel_exprs(load_dashboard()):
        assert not foreign_metrics(expr), expr


def test_foreign_metric_detection() -> None:
    assert foreign_metrics('up{job="claudepool"} == 0') == {"up"}
    assert foreign_metrics('sum by (le, job) (rate(claudepool_x_bucket{a=~"b|c"}[5m])) > 2') == set()
    assert foreign_metrics("topk(10, sum by (t) (increase(node_load1[1h]))) * 1e3") == {"node_load1"}


# -- promtool ---------------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: .ci/run installs it (Debian/Ubuntu: apt-get install prometheus, "
                    "which ships /usr/bin/promtool)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False,
                          cwd=GRAFANA)


def test_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_promql_passes_promtool_check(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    rules = [{"record": f"claudepool_test:panel_{panel_id}_{index}", "expr": promql_for_promtool(expr)}
             for panel_id, index, expr in panel_exprs(dashboard)]
    rules += [{"record": f"claudepool_test:variable_{i}", "expr": re.sub(r"^label_values\((\w+),.*$", r"\1", q)}
              for i, q in enumerate(variable_queries(dashboard))]
    path = tmp_path / "dashboard-rules.yml"
    # JSON is YAML: no YAML library needed.
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_check_rejects_bad_promql(tmp_path: Path) -> None:
    """The check above would catch a broken panel query."""
    path = tmp_path / "bad.yml"
    expr = promql_for_promtool('sum by (state) (claudepool_workers{profile=~"$profile"}')
    path.write_text(json.dumps({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": expr}]}]}))
    assert run_promtool("check", "rules", str(path)).returncode != 0


# -- every metric used is exported by a real daemon -------------------------------------------------


def family_of(name: str, families: dict[str, Metric]) -> Metric | None:
    """The exported family a series name belongs to, allowing ``_total`` and histogram series names."""
    family = families.get(name)
    if family is not None and family.type not in ("counter", "histogram", "summary"):
        return family
    if name.endswith("_total"):
        family = families.get(name.removesuffix("_total"))
        if family is not None and family.type == "counter":
            return family
    base = HISTOGRAM_SERIES.sub("", name)
    if base != name:
        family = families.get(base)
        if family is not None and (family.type == "histogram" or (
                family.type == "summary" and not name.endswith("_bucket"))):
            return family
    return None


def label_problems(exprs: list[str], families: dict[str, Metric]) -> list[str]:
    """Label names and exact label values in selectors, and grouping labels, the daemon never exports."""
    problems: list[str] = []
    for expr in exprs:
        known: set[str] | None = set(TARGET_LABELS) | {"le"}
        for name in METRIC.findall(expr):
            family = family_of(name, families)
            if family is None or not family.samples:
                known = None  # no series yet (e.g. no upstream retry happened): its labels are unknown
            elif known is not None:
                known |= {label for sample in family.samples for label in sample.labels}
        for name, matchers in SELECTOR.findall(expr):
            family = family_of(name, families)
            if family is None or not family.samples:
                continue
            for label, op, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                values = {sample.labels[label] for sample in family.samples if label in sample.labels}
                if not values:
                    problems.append(f"{name} has no label {label!r}: {expr}")
                elif "$" not in value and op in ("=", "=~") and re.fullmatch(r"[\w|]+", value):
                    unknown = set(value.split("|") if op == "=~" else [value]) - values
                    if unknown:
                        problems.append(f"{name}{{{label}}} never takes the values {sorted(unknown)}: {expr}")
        if known is None:
            continue
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                if label not in known:
                    problems.append(f"grouping label {label!r} is not a label of the metrics used: {expr}")
    return problems


def missing_metrics(names: set[str], families: dict[str, Metric]) -> set[str]:
    return {name for name in names if family_of(name, families) is None}


async def post(d: RunningDaemon, body: dict[str, Any], tenant: str) -> int:
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.url}/v1/prompt", data=orjson.dumps(body), headers={"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}
    ) as resp:
        await resp.read()
        return resp.status


async def scrape(d: RunningDaemon) -> dict[str, Metric]:
    text = await d.metrics_text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Metric], series: str, **labels: str) -> float:
    family = family_of(series, families)
    assert family is not None, series
    return sum(s.value for s in family.samples if s.name == series and labels.items() <= s.labels.items())


async def test_every_metric_used_is_exported_by_a_real_daemon(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(
        tenants={"acme": {"requests_per_minute": 2},
                 "gamma": {"key": GAMMA_KEY, "daily_budget_usd": 0.0001}},
        pricing=FAKE_PRICING, profiles=AGENT,
    )
    await spend(d.daemon.store, "gamma", 0.0001)
    assert await post(d, {"prompt": "[[reply:hello]]"}, "acme") == 200
    assert await post(d, {"prompt": "[[reply:one two three four five]]", "stream": True}, "acme") == 200
    assert await post(d, {"prompt": "one too many"}, "acme") == 429
    assert await post(d, {"prompt": "[[reply:hi]]"}, "beta") == 200
    assert await post(d, {"prompt": "[[api_error:529]]"}, "beta") == 200  # a model error is a result
    assert await post(d, {"prompt": "[[crash]] [[reply:partial answer]]"}, "beta") == 502
    assert await post(d, {"prompt": "too expensive"}, "gamma") == 402
    await until(lambda: d.daemon.meter.backlog == 0 and d.daemon.service.in_flight == 0, 10)
    await until(lambda: d.pool().stats.resets >= 2, 10)
    families = await scrape(d)

    # The traffic is visible, so the label checks below see real series.
    assert sample(families, "claudepool_requests_total", tenant="acme", outcome="ok") == 2
    assert sample(families, "claudepool_requests_total", tenant="beta", outcome="model_error") == 1
    assert sample(families, "claudepool_rejections_total", tenant="acme", kind="requests_per_minute") == 1
    assert sample(families, "claudepool_rejections_total", tenant="gamma", kind="budget") == 1
    assert sample(families, "claudepool_worker_exits_total", reason="crash") == 1
    assert sample(families, "claudepool_upstream_errors_total", status="529") == 1
    assert sample(families, "claudepool_tenant_budget_usd", tenant="gamma", period="day") == 0.0001
    assert sample(families, "claudepool_cost_usd_total", tenant="beta") > 0
    assert sample(families, "claudepool_time_to_first_token_seconds_count") >= 1

    dashboard = dashboard_exprs(load_dashboard())
    rules = alert_exprs(ALERTS.read_text())
    used = metric_names(dashboard) | metric_names(rules)
    assert len(used) >= 30
    assert not missing_metrics(used, families), "used but not exported"
    assert not label_problems(dashboard + rules, families)
    for query in variable_queries(load_dashboard()):
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
        assert match is not None, query
        metric, label = match.groups()
        family = family_of(metric, families)
        assert family is not None
        assert any(label in s.labels for s in family.samples), query

    # The check bites: a panel on a metric the daemon does not export, or on a wrong label value, fails it.
    bogus = load_dashboard()
    next(panels(bogus))["targets"].append({"expr": 'sum(rate(claudepool_bogus_total[5m]))', "refId": "Z"})
    assert missing_metrics(metric_names(dashboard_exprs(bogus)), families) == {"claudepool_bogus_total"}
    assert missing_metrics({"claudepool_workers_total", "claudepool_requests", "claudepool_queue_wait_seconds"},
                           families) == {"claudepool_workers_total", "claudepool_requests",
                                         "claudepool_queue_wait_seconds"}
    assert label_problems(['claudepool_max_workers{kind="efective"}', "sum by (tenant) (claudepool_workers)"],
                          families) == [
        "claudepool_max_workers{kind} never takes the values ['efective']: claudepool_max_workers{kind=\"efective\"}",
        "grouping label 'tenant' is not a label of the metrics used: sum by (tenant) (claudepool_workers)"]


# Series that exist only once their label value has been seen: a model is known when it first answers;
# the provider reports its account's limits (and which kinds it has) only in its answers, and a 0 before
# that would read "unused" when it is unknown. Their 429/529 counts do start at 0 for every account.
# A fallback is counted by the trigger the CLI names, known only once it has fallen back.
SEEN_ONLY = {"claudepool_tokens_total", "claudepool_cost_usd_total", "claudepool_upstream_ratelimit_utilisation",
             "claudepool_model_fallbacks_total"}


async def test_every_series_the_dashboard_uses_has_a_sample_at_start(make_daemon: MakeDaemon) -> None:
    # Issue item 9: panels on series created by an event said "No data" instead of 0 until it happened.
    # No traffic, and no maintenance pass: what is there comes from start-up alone.
    d = await make_daemon(tenants={"gamma": {"key": GAMMA_KEY, "daily_budget_usd": 1.0}},
                          pool={"maintenance_interval_s": 3600}, profiles=AGENT)
    await until(lambda: all(w.pss_bytes for w in d.pool().workers()), 10)
    families = await scrape(d)
    used = metric_names(dashboard_exprs(load_dashboard())) | metric_names(alert_exprs(ALERTS.read_text()))
    empty = {name for name in used - SEEN_ONLY
             if (family := family_of(name, families)) is None or not family.samples}
    assert not empty, "no sample until an event happens"
    for status in ("429", "529"):
        assert sample(families, "claudepool_upstream_throttled_total", account="default", status=status) == 0
    for status in ("429", "500", "502", "503", "504", "529", "none"):
        assert sample(families, "claudepool_upstream_errors_total", status=status) == 0
        assert sample(families, "claudepool_upstream_retries_total", status=status) == 0
    spent = family_of("claudepool_tenant_spent_usd", families)
    assert spent is not None
    assert {(s.labels["tenant"], s.labels["period"]) for s in spent.samples} == {("gamma", "day"), ("gamma", "month")}
    pss = family_of("claudepool_worker_pss_bytes", families)
    assert pss is not None
    assert {s.labels["slot"] for s in pss.samples if s.labels["profile"] == "default"} == {
        str(w.slot) for w in d.pool().workers()}
