"""The provider's side of a reconciliation: its Usage & Cost Admin API, read with the Admin API key.

    GET /v1/organizations/usage_report/messages?starting_at=…&ending_at=…&bucket_width=1d&group_by[]=model
        &group_by[]=service_tier
    GET /v1/organizations/cost_report?starting_at=…&ending_at=…&bucket_width=1d&group_by[]=description

each followed through its pages (``has_more``, ``next_page`` as ``page``). Answers are validated with
strict models: a field of the wrong type, a report without its ``data`` or ``has_more``, a token
count or an amount gone missing, or a currency other than USD is an error, never a zero. Fields the
provider adds later are ignored.

A cost amount is what the docs say it is: a decimal string in the currency's lowest unit, cents
("123.45" USD is $1.23). Grouped by ``description``, a token cost names its model, token type and
service tier (``batch``: a request of a Message Batch, billed at half price);
web search and code execution costs name no model (they are counted as model `NON_TOKEN`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Self, TypeVar

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from claudepool.errors import ProviderReportUnavailable
from claudepool.gateway.settings import API_VERSION

USAGE_PATH = "/v1/organizations/usage_report/messages"
COST_PATH = "/v1/organizations/cost_report"
# The most buckets of a day the provider gives in one page.
MAX_DAYS_PER_PAGE = 31
# A report longer than this many pages is not believed (a provider answering the same token forever).
_MAX_PAGES = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class CacheCreation(_Strict):
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int


class UsageResult(_Strict):
    """One row of a usage bucket: one model's tokens of one service tier when grouped by both."""

    model: str | None = None
    service_tier: str | None = None
    uncached_input_tokens: int
    cache_read_input_tokens: int
    cache_creation: CacheCreation
    output_tokens: int


class UsageBucket(_Strict):
    starting_at: datetime
    ending_at: datetime
    results: list[UsageResult]


class UsageReport(_Strict):
    data: list[UsageBucket]
    has_more: bool
    next_page: str | None = None


class CostResult(_Strict):
    """One row of a cost bucket: a model's cost of one token type, when grouped by description."""

    amount: str  # cents, as a decimal string
    currency: Literal["USD"]
    model: str | None = None
    service_tier: str | None = None
    cost_type: str | None = None
    token_type: str | None = None
    description: str | None = None

    @field_validator("amount")
    @classmethod
    def _decimal(cls, value: str) -> str:
        try:
            if not Decimal(value).is_finite():
                raise ValueError
        except (InvalidOperation, ValueError):
            raise ValueError(f"expected a decimal string, got {value!r}") from None
        return value

    @property
    def usd(self) -> Decimal:
        return Decimal(self.amount) / 100


class CostBucket(_Strict):
    starting_at: datetime
    ending_at: datetime
    results: list[CostResult]


class CostReport(_Strict):
    data: list[CostBucket]
    has_more: bool
    next_page: str | None = None


Report = TypeVar("Report", UsageReport, CostReport)


class AdminApi:
    """The two reports of one organisation. The key goes in ``x-api-key`` and nowhere else (not in
    an error, not in a log line).

    >>> async def today(base_url, key, start, end):                        # doctest: +SKIP
    ...     async with AdminApi(base_url, key) as api:
    ...         return await api.usage(start, end), await api.cost(start, end)
    """

    def __init__(self, base_url: str, admin_key: str, *, timeout_s: float = 60.0,
                 days_per_page: int = MAX_DAYS_PER_PAGE) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"x-api-key": admin_key, "anthropic-version": API_VERSION, "accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._days_per_page = days_per_page
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def usage(self, starting_at: datetime, ending_at: datetime) -> list[UsageBucket]:
        """Tokens per UTC day, model and service tier, from ``starting_at`` to before ``ending_at``."""
        query = self._query(starting_at, ending_at, group_by=("model", "service_tier"))
        return [bucket async for page in self._pages(USAGE_PATH, query, UsageReport) for bucket in page.data]

    async def cost(self, starting_at: datetime, ending_at: datetime) -> list[CostBucket]:
        """What they cost per UTC day, model and token type, from ``starting_at`` to before ``ending_at``."""
        query = self._query(starting_at, ending_at, group_by=("description",))
        return [bucket async for page in self._pages(COST_PATH, query, CostReport) for bucket in page.data]

    def _query(self, starting_at: datetime, ending_at: datetime, *,
               group_by: tuple[str, ...]) -> list[tuple[str, str]]:
        return [("starting_at", _rfc3339(starting_at)), ("ending_at", _rfc3339(ending_at)), ("bucket_width", "1d"),
                *(("group_by[]", g) for g in group_by), ("limit", str(self._days_per_page))]

    async def _pages(self, path: str, query: list[tuple[str, str]], model: type[Report]) -> AsyncIterator[Report]:
        page_token: str | None = None
        for _ in range(_MAX_PAGES):
            params = [*query, ("page", page_token)] if page_token else query
            report = self._parse(model, await self._get(path, params), path)
            yield report
            if not report.has_more:
                return
            if not report.next_page or report.next_page == page_token:
                raise ProviderReportUnavailable(f"{path}: has_more without a new next_page")
            page_token = report.next_page
        raise ProviderReportUnavailable(f"{path}: more than {_MAX_PAGES} pages")

    async def _get(self, path: str, params: list[tuple[str, str]]) -> bytes:
        assert self._session is not None, "use AdminApi as an async context manager"
        url = self.base_url + path
        try:
            async with self._session.get(url, params=params, headers=self._headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise ProviderReportUnavailable(f"{url}: HTTP {resp.status}{_error_text(raw)}")
                return raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderReportUnavailable(f"cannot reach {url}: {type(exc).__name__} {exc}") from None

    @staticmethod
    def _parse(model: type[Report], raw: bytes, path: str) -> Report:
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(str(p) for p in problem["loc"]) or "the answer"
            raise ProviderReportUnavailable(f"{path}: not a {model.__name__} ({field}: {problem['msg']})") from None


def _error_text(raw: bytes) -> str:
    """The provider's error, as its body names it: ``: authentication_error: invalid x-api-key``."""
    try:
        body: Any = orjson.loads(raw)
        error = body["error"]
        return f": {error['type']}: {error['message']}"[:300]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
