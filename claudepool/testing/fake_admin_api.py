"""The provider's Usage & Cost Admin API, as the fake upstream computes it from its own request log.

Two endpoints, in the shapes the provider documents, authenticated with ``x-api-key`` set to the
organisation's Admin API key (anything else: 401 ``authentication_error``, in the provider's error
shape):

    GET /v1/organizations/usage_report/messages   tokens per time bucket (and per model with
                                                    group_by[]=model)
    GET /v1/organizations/cost_report             what they cost, in cents, per bucket (and per model
                                                    and token type with group_by[]=description)

Query: ``starting_at`` (RFC 3339, required; snapped to the start of its bucket in UTC), ``ending_at``
(the fake returns buckets that start before it, the last one counting only what came before it;
default: through the bucket holding now), ``bucket_width`` (``1d``, ``1h``, ``1m``; the cost report
only ``1d``), ``group_by[]``, ``limit`` (buckets per page; 1d: 7 by default, at most 31) and ``page``
(the ``next_page`` of the previous answer, while ``has_more``). Every bucket of the range is
returned, an empty one with ``results: []``.

It bills what it *sent*: a message request counts with the usage its answer had reported when the
answer ended (`RecordedRequest.usage`: a stream cut after ``message_start`` counts that event's
input side and its first output count), in the bucket of the time it arrived; an error answer
counts nothing. Costs are the request log priced with the fake's `PricingTable`, so a test prices
both sides alike.

A Message Batches request (`claudepool.testing.fake_batches`) counts once its batch has ended and
only if it succeeded, in the bucket of the time its batch was created, with service tier ``batch``:
at `BATCH_PRICE_FACTOR` of the list price, as the provider bills the Batches API. Grouped by
``service_tier``, the usage report gives its tokens a row of their own; the cost report grouped by
``description`` names each row's tier (``standard`` or ``batch``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from aiohttp import web
from multidict import MultiMapping

from claudepool.tenancy.budgets import PricingTable

USAGE_PATH = "/v1/organizations/usage_report/messages"
COST_PATH = "/v1/organizations/cost_report"
Query = MultiMapping[str]
# What a Message Batches request costs, as a fraction of the list price ("50% of standard prices").
BATCH_PRICE_FACTOR = 0.5
# Bucket widths: their length, and the default and largest number of buckets in one page.
_WIDTHS = {"1d": (timedelta(days=1), 7, 31), "1h": (timedelta(hours=1), 24, 168),
           "1m": (timedelta(minutes=1), 60, 1440)}
_USAGE_GROUPS = frozenset({"account_id", "api_key_id", "context_window", "inference_geo", "model",
                           "service_account_id", "service_tier", "speed", "workspace_id"})
_COST_GROUPS = frozenset({"workspace_id", "description"})
# The token types of the cost report, each with the usage report's field and its price's name.
_TOKEN_TYPES = (
    ("uncached_input_tokens", "input_tokens", "Input Tokens"),
    ("output_tokens", "output_tokens", "Output Tokens"),
    ("cache_read_input_tokens", "cache_read_input_tokens", "Cache Read Input Tokens"),
    ("cache_creation.ephemeral_5m_input_tokens", "cache_creation_input_tokens", "5m Cache Write Input Tokens"),
    ("cache_creation.ephemeral_1h_input_tokens", "cache_write_1h_input_tokens", "1h Cache Write Input Tokens"),
)


class Billable(Protocol):
    """One request of the fake's log, as the reports read it."""

    @property
    def received_unix(self) -> float: ...
    @property
    def model(self) -> str: ...
    @property
    def usage(self) -> dict[str, Any] | None: ...
    @property
    def service_tier(self) -> str: ...


class AdminSource(Protocol):
    """What the reports are made of: the log, the key that may read it, the prices."""

    @property
    def admin_key(self) -> str: ...
    @property
    def pricing(self) -> PricingTable: ...
    def billable_requests(self) -> Sequence[Billable]: ...


def add_routes(app: web.Application, source: AdminSource) -> None:
    """Serve both reports of ``source`` on ``app``."""

    async def usage(request: web.Request) -> web.Response:
        return _answer(request, source, _usage_report)

    async def cost(request: web.Request) -> web.Response:
        return _answer(request, source, _cost_report)

    app.router.add_get(USAGE_PATH, usage)
    app.router.add_get(COST_PATH, cost)


class _BadQuery(Exception):
    pass


@dataclass(frozen=True)
class _Page:
    buckets: list[tuple[datetime, datetime]]  # this page's buckets, [start, end)
    next_start: datetime | None  # the first bucket of the next page, if there is one
    group_by: frozenset[str]


def _answer(request: web.Request, source: AdminSource,
            report: Callable[[Query, AdminSource], dict[str, Any]]) -> web.Response:
    presented = request.headers.get("x-api-key", "")
    if not source.admin_key or not hmac.compare_digest(presented.encode(), source.admin_key.encode()):
        return web.json_response(_error("authentication_error", "invalid x-api-key"), status=401)
    try:
        body = report(request.query, source)
    except _BadQuery as exc:
        return web.json_response(_error("invalid_request_error", str(exc)), status=400)
    return web.json_response(body)


def _usage_report(query: Query, source: AdminSource) -> dict[str, Any]:
    page = _page(query, widths=("1d", "1h", "1m"), groups=_USAGE_GROUPS)
    data = []
    for start, end in page.buckets:
        rows: dict[tuple[str | None, str | None], dict[str, int]] = {}
        for usage, model, tier in _billed(source.billable_requests(), start, end):
            key = (model if "model" in page.group_by else None, tier if "service_tier" in page.group_by else None)
            row = rows.setdefault(key, dict.fromkeys((f for _, f, _ in _TOKEN_TYPES), 0))
            for field, count in usage.items():
                row[field] += count
        results = [{
            "uncached_input_tokens": row["input_tokens"],
            "cache_creation": {"ephemeral_1h_input_tokens": row["cache_write_1h_input_tokens"],
                               "ephemeral_5m_input_tokens": row["cache_creation_input_tokens"]},
            "cache_read_input_tokens": row["cache_read_input_tokens"],
            "output_tokens": row["output_tokens"],
            "server_tool_use": {"web_search_requests": 0},
            **_dimensions(page.group_by, model=model, tier=tier),
        } for (model, tier), row in sorted(rows.items(), key=lambda item: [x or "" for x in item[0]])]
        data.append(_bucket(start, end, results))
    return _envelope(data, page)


def _cost_report(query: Query, source: AdminSource) -> dict[str, Any]:
    page = _page(query, widths=("1d",), groups=_COST_GROUPS)
    by_item = "description" in page.group_by
    data = []
    for start, end in page.buckets:
        cents: dict[tuple[str | None, str | None, str | None], Decimal] = {}
        for usage, model, tier in _billed(source.billable_requests(), start, end):
            factor = Decimal(repr(BATCH_PRICE_FACTOR)) if tier == "batch" else Decimal(1)
            for token_type, field, _ in _TOKEN_TYPES:
                count: dict[str, Any] = {field: usage[field]}  # Any: mypy cannot tell it from ``batch``
                usd = source.pricing.cost(model, **count)
                key = (model, token_type, tier) if by_item else (None, None, None)
                cents[key] = cents.get(key, Decimal(0)) + Decimal(repr(usd)) * 100 * factor
        results = []
        for (item_model, item_type, item_tier), amount in sorted(cents.items(),
                                                                 key=lambda kv: [x or "" for x in kv[0]]):
            label = next((name for t, _, name in _TOKEN_TYPES if t == item_type), "")
            results.append({
                # The docs: "Cost amount in lowest currency units (e.g. cents) as a decimal string. For
                # example, "123.45" in "USD" represents $1.23." This fake keeps 6 decimals of a cent.
                "amount": f"{amount:.6f}", "currency": "USD",
                "cost_type": "tokens" if by_item else None,
                "description": (f"{item_model} Usage - {label}" + (" (Batch)" if item_tier == "batch" else ""))
                if by_item else None,
                "model": item_model, "token_type": item_type,
                "context_window": "0-200k" if by_item else None, "service_tier": item_tier if by_item else None,
                "inference_geo": None, "workspace_id": None,
            })
        data.append(_bucket(start, end, results))
    return _envelope(data, page)


def _billed(requests: Iterable[Billable], start: datetime,
            end: datetime) -> Iterable[tuple[dict[str, int], str, str]]:
    """Each request that arrived in [start, end) and had usage reported: its tokens by price field,
    its model and its service tier."""
    low, high = start.timestamp(), end.timestamp()
    for r in requests:
        if r.usage is None or not low <= r.received_unix < high:
            continue
        split = r.usage.get("cache_creation")
        one_hour = int(split.get("ephemeral_1h_input_tokens", 0)) if isinstance(split, dict) else 0
        yield {"input_tokens": int(r.usage.get("input_tokens", 0)),
               "output_tokens": int(r.usage.get("output_tokens", 0)),
               "cache_read_input_tokens": int(r.usage.get("cache_read_input_tokens", 0)),
               "cache_creation_input_tokens": int(r.usage.get("cache_creation_input_tokens", 0)) - one_hour,
               "cache_write_1h_input_tokens": one_hour}, r.model, r.service_tier


def _page(query: Query, *, widths: tuple[str, ...], groups: frozenset[str]) -> _Page:
    width_name = query.get("bucket_width", "1d")
    if width_name not in widths:
        raise _BadQuery(f"bucket_width: expected one of {', '.join(widths)}")
    width, default_limit, max_limit = _WIDTHS[width_name]
    group_by = frozenset(query.getall("group_by[]", []) + query.getall("group_by", []))
    if group_by - groups:
        raise _BadQuery(f"group_by: unknown {', '.join(sorted(group_by - groups))}")
    try:
        limit = int(query.get("limit", default_limit))
    except ValueError:
        raise _BadQuery("limit: expected an integer") from None
    if not 1 <= limit <= max_limit:
        raise _BadQuery(f"limit: expected 1 to {max_limit} for bucket_width {width_name}")
    if "starting_at" not in query:
        raise _BadQuery("starting_at: required")
    first = _snap(_timestamp(query["starting_at"], "starting_at"), width)
    ending_at = _timestamp(query["ending_at"], "ending_at") if "ending_at" in query else (
        _snap(datetime.now(UTC), width) + width)
    start = first
    if "page" in query:
        start = _from_token(query["page"])
        if start < first or (start - first) % width:
            raise _BadQuery("page: not a page of this query")
    buckets: list[tuple[datetime, datetime]] = []
    while start < ending_at and len(buckets) < limit:
        buckets.append((start, min(start + width, ending_at)))
        start += width
    return _Page(buckets, start if start < ending_at else None, group_by)


def _snap(moment: datetime, width: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + (moment - epoch) // width * width


def _timestamp(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _BadQuery(f"{name}: expected an RFC 3339 timestamp") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _token(start: datetime) -> str:
    # As the provider's tokens look: "page_" and the next bucket's start, base64-encoded.
    return "page_" + base64.urlsafe_b64encode(_rfc3339(start).encode()).decode()


def _from_token(token: str) -> datetime:
    try:
        return _timestamp(base64.urlsafe_b64decode(token.removeprefix("page_").encode()).decode(), "page")
    except (binascii.Error, UnicodeDecodeError, _BadQuery):
        raise _BadQuery("page: not a page token") from None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bucket(start: datetime, end: datetime, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"starting_at": _rfc3339(start), "ending_at": _rfc3339(end), "results": results}


def _envelope(data: list[dict[str, Any]], page: _Page) -> dict[str, Any]:
    more = page.next_start is not None
    return {"data": data, "has_more": more, "next_page": _token(page.next_start) if page.next_start else None}


def _dimensions(group_by: frozenset[str], *, model: str | None, tier: str | None) -> dict[str, Any]:
    """The usage report's grouping fields: each null unless grouped by (this fake has one workspace,
    one key, the 0-200k context window)."""
    fixed = {"model": model, "service_tier": tier, "context_window": "0-200k", "inference_geo": "not_available",
             "speed": "standard"}
    return {name: fixed.get(name) if name in group_by else None for name in sorted(_USAGE_GROUPS)}


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}
