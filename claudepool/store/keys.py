"""Every Redis key the Redis store uses, in one place.

All of a tenant's keys start with ``{prefix}:{{{tenant}}}:`` — the braces are a Redis Cluster *hash
tag*, so one tenant's keys hash to one slot and a script may touch all of them. Every script and
every transaction touches the keys of one tenant only (tests/test_store_redis.py watches each one
run, with MONITOR, and checks the slot of every key it touched). The reserve and budget scripts
name the day's and month's spend keys from Redis's clock (`spend_prefix` plus the date): the same
tag, the same slot. The only key outside a tenant's tag is the global set of tenants
(``cp:tenants``), written by a command of its own before the script or transaction that writes the
tenant's data, so it lists every tenant with data (and, after a write that failed, perhaps one with
none).

=======================================  ======  ==========================================================
key (prefix ``cp``, tenant ``acme``)     type    content and lifetime
=======================================  ======  ==========================================================
``cp:tenants``                           SET     tenants that ever wrote a record or session; no TTL
``cp:{acme}:res``                        ZSET    live reservation id -> expiry (unix s); TTL refreshed to
                                                 outlive the longest reservation by `RESERVATION_GRACE_S`
``cp:{acme}:res:amt``                    HASH    reservation id -> amount (USD, decimal string); as above
``cp:{acme}:res:sum``                    HASH    ``n`` -> how many ``res:amt`` entries it sums, ``usd`` ->
                                                 their sum, kept by every script that changes them, so
                                                 no reserve adds them up; as above
``cp:{acme}:spend:d:20260124``           STRING  USD spent that UTC day (INCRBYFLOAT); `DAY_TTL_S`
``cp:{acme}:spend:m:202601``             STRING  USD spent that UTC month; `MONTH_TTL_S`
``cp:{acme}:usage:d:20260124``           HASH    ``<model>\\x1f<field>`` -> total, one field per
                                                 `USAGE_FIELDS` entry and model; `DAY_TTL_S`
``cp:{acme}:usage:m:202601``             HASH    the same for the month; `MONTH_TTL_S`
``cp:{acme}:settled``                    ZSET    settled record id -> settle time (unix s), for
                                                 idempotency: the newest `SETTLED_MAX_IDS`, none older
                                                 than `SETTLED_TTL_S`
``cp:{acme}:ledger``                     STREAM  one entry per settled record, field ``r`` = JSON;
                                                 trimmed to about ``ledger_max_records``; no TTL
``cp:{acme}:sessions``                   HASH    session id -> session record (JSON); entries are
                                                 deleted by the daemon's retention sweep
``cp:{acme}:rate:requests``              HASH    rate-limit sub-bucket (Redis time in us // bucket width)
                                                 -> requests admitted in it; at most one window of
                                                 buckets plus one (older ones are deleted by the next
                                                 check); TTL one window plus two buckets
``cp:{acme}:rate:tokens``                HASH    the same for the tokens of settled turns
``cp:{acme}:sessions:open``              SET     ids of the tenant's sessions not closed, written in
                                                 the same transaction as the record: the O(1) count
                                                 ``max_sessions`` is checked against
``cp:{acme}:conv:<sha256 hex>``          STRING  the session a chat history (its digest) continues;
                                                 claimed with GETDEL; TTL the conversations' idle TTL
=======================================  ======  ==========================================================

TTLs are relative and refreshed on every write, so a day bucket lives about 40 days after its last
settlement. Model names may contain ``:`` and ``-``; the usage field separator is the ASCII unit
separator (``\\x1f``), which no model name contains.
"""

from __future__ import annotations

from claudepool.store.base import SETTLED_MAX_IDS as SETTLED_MAX_IDS  # the settled ZSET's length bound
from claudepool.store.base import SETTLED_MEMORY_S, WindowKind

DEFAULT_PREFIX = "cp"

DAY_TTL_S = 40 * 86400
MONTH_TTL_S = 400 * 86400
SETTLED_TTL_S = int(SETTLED_MEMORY_S)
# Reservation keys outlive their longest reservation by this much; expired entries are dropped
# by the next reserve anyway, the TTL only cleans up after a tenant that stops sending requests.
RESERVATION_GRACE_S = 60

USAGE_FIELD_SEP = "\x1f"


def tenants(prefix: str = DEFAULT_PREFIX) -> str:
    """SET of every tenant with data: the one key not tagged per tenant."""
    return f"{prefix}:tenants"


def tenant_prefix(prefix: str, tenant: str) -> str:
    """``cp:{acme}:`` — what every key of ``tenant`` starts with."""
    return f"{prefix}:{{{tenant}}}:"


def reservations(prefix: str, tenant: str) -> str:
    """ZSET reservation id -> expiry (unix seconds)."""
    return tenant_prefix(prefix, tenant) + "res"


def reservation_amounts(prefix: str, tenant: str) -> str:
    """HASH reservation id -> amount in USD."""
    return tenant_prefix(prefix, tenant) + "res:amt"


def reservation_total(prefix: str, tenant: str) -> str:
    """HASH ``n`` (entries summed), ``usd`` (their sum): the `reservation_amounts` hash, added up."""
    return tenant_prefix(prefix, tenant) + "res:sum"


def bucket(kind: WindowKind, key: str) -> str:
    """``d:20260124`` or ``m:202601``: the time bucket part of a spend or usage key."""
    return f"{kind[0]}:{key}"


def spend_prefix(prefix: str, tenant: str, kind: WindowKind) -> str:
    """``cp:{acme}:spend:d:`` — the reserve script appends the day (or month) it reads from Redis's clock."""
    return tenant_prefix(prefix, tenant) + "spend:" + bucket(kind, "")


def spend(prefix: str, tenant: str, kind: WindowKind, key: str) -> str:
    """STRING: USD spent in one UTC day (``key`` YYYYMMDD) or month (YYYYMM)."""
    return spend_prefix(prefix, tenant, kind) + key


def usage(prefix: str, tenant: str, kind: WindowKind, key: str) -> str:
    """HASH of usage totals for one UTC day or month; fields from `usage_field`."""
    return tenant_prefix(prefix, tenant) + "usage:" + bucket(kind, key)


def usage_field(model: str, name: str) -> str:
    """The hash field holding total ``name`` (one of `USAGE_FIELDS`) for ``model``."""
    return f"{model}{USAGE_FIELD_SEP}{name}"


def split_usage_field(field: str) -> tuple[str, str]:
    """``usage_field`` inverted: ``(model, name)``."""
    model, _, name = field.rpartition(USAGE_FIELD_SEP)
    return model, name


def settled(prefix: str, tenant: str) -> str:
    """ZSET settled record id -> settle time (unix seconds)."""
    return tenant_prefix(prefix, tenant) + "settled"


def ledger(prefix: str, tenant: str) -> str:
    """STREAM of settled records, oldest first."""
    return tenant_prefix(prefix, tenant) + "ledger"


def sessions(prefix: str, tenant: str) -> str:
    """HASH session id -> session record JSON."""
    return tenant_prefix(prefix, tenant) + "sessions"


def rate_requests(prefix: str, tenant: str) -> str:
    """HASH rate-limit sub-bucket index -> requests admitted in that bucket."""
    return tenant_prefix(prefix, tenant) + "rate:requests"


def rate_tokens(prefix: str, tenant: str) -> str:
    """HASH rate-limit sub-bucket index -> tokens of the turns settled in that bucket."""
    return tenant_prefix(prefix, tenant) + "rate:tokens"


def open_sessions(prefix: str, tenant: str) -> str:
    """SET of the tenant's session ids that are not closed."""
    return tenant_prefix(prefix, tenant) + "sessions:open"


def conversation(prefix: str, tenant: str, digest: str) -> str:
    """STRING: the session id the tenant's conversation ``digest`` continues."""
    return tenant_prefix(prefix, tenant) + "conv:" + digest
