"""One exception hierarchy, grouped by what the caller does next.

Every error carries a stable wire ``code`` and an HTTP ``status`` so the front ends map it without a
table of their own, and ``retryable`` tells a client whether sending the same request again may work.
"""

from __future__ import annotations

from typing import ClassVar


class ClaudepoolError(Exception):
    """Base of every error claudepool raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    # Seconds a client should wait before retrying (sent as Retry-After), when retrying makes sense.
    # A class default that an instance may refine (a rate limit knows when its window frees up).
    retry_after_s: float | None = None

    def __init__(self, *args: object, retry_after_s: float | None = None) -> None:
        super().__init__(*args)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


# -- protocol: a peer sent bytes we cannot accept ---------------------------------------------


class ProtocolError(ClaudepoolError):
    """A stream-json or client frame violated the protocol."""

    code = "protocol_error"
    status = 400


class FrameTooLarge(ProtocolError):
    """A line exceeded the configured maximum size."""

    code = "frame_too_large"
    status = 413

    def __init__(self, *args: object, head: bytes = b"") -> None:
        super().__init__(*args)
        self.head = head  # the line's first bytes: enough to find the id the answer belongs to


class CorruptFrame(ProtocolError):
    """A line was not a JSON object, or not a valid event of its type."""

    code = "corrupt_frame"


# -- request: the caller asked for something it cannot have -----------------------------------


class RequestError(ClaudepoolError):
    """The request is malformed or not allowed; sending it again unchanged will not help."""

    code = "bad_request"
    status = 400


class BadRequest(RequestError):
    """A body or frame that does not match the API's schema."""


class Unauthorized(RequestError):
    """No key, or a key no tenant (or admin) holds."""

    code = "unauthorized"
    status = 401


class Forbidden(RequestError):
    """The key is valid but may not do this (a profile not granted, an admin endpoint)."""

    code = "forbidden"
    status = 403


class NotFound(RequestError):
    """An unknown profile, session or request id."""

    code = "not_found"
    status = 404


class ModelNotAllowed(RequestError):
    """The request names a model its tenant may not use (not the profile's, nor in ``tenants.NAME.models``)."""

    code = "model_not_allowed"
    status = 400


class UnknownKind(RequestError):
    """The request names a ``kind`` that neither ``[routes]`` nor its tenant's tier routes."""

    code = "unknown_kind"
    status = 400


class PromptTooLarge(RequestError):
    """The prompt exceeds ``server.max_prompt_bytes``."""

    code = "prompt_too_large"
    status = 413


class WorkspacePathRefused(RequestError):
    """A file path into a workspace that may not be used: absolute, with ``..``, ``.``, an empty
    component or NUL, through a symbolic link, or naming a symbolic link, a directory or a special
    file (FIFO, socket, device). Nothing was written or read."""

    code = "workspace_path_refused"
    status = 400


class WorkspaceFilesTooLarge(RequestError):
    """Files over a bound: input files (``server.max_input_files``, ``max_input_file_bytes``,
    ``max_input_bytes``), ``return_files`` patterns (``server.max_return_files``), or a file read
    from a session's workspace (``server.max_file_read_bytes``). Nothing was written."""

    code = "files_too_large"
    status = 413


class RequestTimeout(ClaudepoolError):
    """No complete answer within the request's ``timeout_s``; the turn was interrupted."""

    code = "timeout"
    status = 504
    retryable = True


class Cancelled(ClaudepoolError):
    """The client cancelled the request; the turn was interrupted."""

    code = "cancelled"
    status = 499


class Draining(ClaudepoolError):
    """The daemon is shutting down and takes no new requests, or stopped this one at its deadline."""

    code = "draining"
    status = 503
    retryable = True
    retry_after_s = 5.0


class TooManyConnections(ClaudepoolError):
    """A front end already holds ``server.max_connections`` client connections; this one is closed."""

    code = "too_many_connections"
    status = 503
    retryable = True
    retry_after_s = 1.0


class RequestReadTimeout(RequestError):
    """The request head or body did not arrive within ``server.header_timeout_s``/``body_timeout_s``."""

    code = "request_timeout"
    status = 408


class RemoteError(ClaudepoolError):
    """An error the daemon answered with, as the client library sees it."""

    code = "remote_error"

    def __init__(self, remote_code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(f"{remote_code}: {message}")
        self.remote_code = remote_code
        self.message = message
        self.http_status = http_status


# -- tenancy: limits, budgets and queues --------------------------------------------------------


class TenancyError(ClaudepoolError):
    """The tenant may not be served right now: a limit, budget or queue bound says no."""

    code = "tenancy_error"
    status = 429
    retryable = True


class RateLimited(TenancyError):
    """Requests or tokens per minute exhausted; ``Retry-After`` says when the window frees up."""

    code = "rate_limited"
    status = 429
    retry_after_s = 1.0

    def __init__(self, *args: object, kind: str, retry_after_s: float | None = None) -> None:
        super().__init__(*args, retry_after_s=retry_after_s)
        self.kind = kind  # requests_per_minute | tokens_per_minute


class BudgetExhausted(TenancyError):
    """The tenant's daily or monthly budget cannot cover this request's reservation."""

    code = "budget_exhausted"
    status = 402
    retryable = False


class RequestBudgetExhausted(BudgetExhausted):
    """The request's own budget (``max_budget_usd``, or ``tenants.NAME.max_request_budget_usd``)
    cannot hold its next model call: the request ends, its spend within that budget."""

    code = "request_budget_exhausted"


class TooManyJobs(TenancyError):
    """The tenant has ``jobs.max_open_jobs_per_tenant`` jobs queued or running: wait for some to end."""

    code = "too_many_jobs"
    status = 429
    retryable = True
    retry_after_s = 10.0


class QueueFull(TenancyError):
    """The tenant's or the daemon's queue bound is reached."""

    code = "queue_full"
    status = 503
    retry_after_s = 1.0


class TooManyInFlight(TenancyError):
    """Too many of the caller's requests are in flight at once (prompts on one socket connection,
    ledger reads of one tenant); retry when one of them has ended."""

    code = "too_many_in_flight"
    status = 429
    retry_after_s = 1.0


class TooManySessions(TenancyError):
    """The tenant has ``max_sessions`` open sessions. Not retryable as such: close one (DELETE) or
    wait for one to expire, then create again."""

    code = "too_many_sessions"
    status = 429
    retryable = False


# -- sessions: conversations ------------------------------------------------------------------------


class SessionError(ClaudepoolError):
    """The conversation cannot take this turn."""

    code = "session_error"
    status = 409


class SessionClosed(SessionError):
    """The session was closed (deleted, expired, or at a limit) and takes no more turns."""

    code = "session_closed"
    status = 410


class SessionLimitReached(SessionError):
    """The session reached max turns, age or context; it is now closed."""

    code = "session_limit_reached"


class SessionElsewhere(SessionError):
    """Another daemon holds this session's worker right now; send the turn there, or retry later."""

    code = "session_elsewhere"
    retryable = True
    retry_after_s = 5.0


class SessionCheckpointFailed(SessionError):
    """The turn ran (and was billed) and stays in the conversation, but its transcript could not be
    saved (a full disk): the session keeps its worker, and is not parked, until a save succeeds."""

    code = "session_checkpoint_failed"
    status = 507


class SessionUnavailable(SessionError):
    """The session's transcript is not reachable from this daemon (no shared sessions directory)."""

    code = "session_unavailable"


# -- jobs: durable asynchronous requests ----------------------------------------------------------


class JobNotFound(NotFound):
    """No job with this id among the caller's (another tenant's job is not found either)."""

    code = "job_not_found"


class JobConflict(ClaudepoolError):
    """The job cannot move that way now: its claim was taken over, or it has already ended."""

    code = "job_conflict"
    status = 409


# -- store: where limits, budgets and usage live --------------------------------------------------


class StoreError(ClaudepoolError):
    """The state store (Redis) is unreachable or failed; budgets fail closed on it."""

    code = "store_unavailable"
    status = 503
    retryable = True
    retry_after_s = 2.0


# -- worker: one `claude` process failed; the pool discards it --------------------------------


class WorkerError(ClaudepoolError):
    """A worker process misbehaved; it has been or will be killed, never reused."""

    code = "worker_error"
    status = 502
    retryable = True


class WorkerStartError(WorkerError):
    """The process did not start or did not confirm readiness before its deadline."""

    code = "worker_start_failed"


class WorkerDied(WorkerError):
    """The process exited or broke its output stream while serving."""

    code = "worker_died"


class WorkerProtocolError(WorkerError):
    """The process printed an oversize or corrupt line; its stream can no longer be trusted."""

    code = "worker_protocol_error"


class PromptRanAsCommand(WorkerError):
    """The CLI ran a tenant's prompt as a slash command although it was marked as text; the worker's
    process state can no longer be trusted, so it is retired."""

    code = "prompt_ran_as_command"
    retryable = False


class WorkerBusy(WorkerError):
    """A second exchange was attempted while one was running (a caller bug, never sent to the CLI)."""

    code = "worker_busy"
    retryable = False


class TurnStalled(WorkerError):
    """The watchdog saw no event for too long; the turn was interrupted or the worker killed."""

    code = "turn_stalled"
    status = 504


class WorkspaceFull(WorkerError):
    """A sandboxed lease wrote more than its workspace may hold (``max_workspace_bytes``); the worker,
    and what it wrote, are gone."""

    code = "workspace_full"
    status = 507
    retryable = False


class ResetFailed(WorkerError):
    """``/clear`` was not confirmed in time; the worker is killed rather than reused."""

    code = "reset_failed"


# -- pool: no worker could be had --------------------------------------------------------------


class PoolError(ClaudepoolError):
    """The pool cannot serve the request now."""

    code = "pool_error"
    status = 503
    retryable = True
    retry_after_s = 1.0


class PoolTimeout(PoolError):
    """No worker became free before the caller's deadline."""

    code = "pool_timeout"


class PoolUnhealthy(PoolError):
    """Workers keep failing to boot; the breaker is open and spawning is paused."""

    code = "pool_unhealthy"


class PoolClosed(PoolError):
    """The pool is draining or closed and takes no new leases."""

    code = "pool_closed"


class TooManyPools(PoolError):
    """A new system prompt needs a pool of its own, and every on-demand pool up to the bound
    (``pool.max_on_demand_pools``) is serving or awaited, so none could be closed to make room."""

    code = "too_many_pools"
    retry_after_s = 5.0


# -- gateway: a worker's model call refused or not delivered -----------------------------------
# Answered to the CLI, not to a tenant, in the provider's own error format (`anthropic_type`), so the
# CLI reacts as it would to the provider: it does not retry a 4xx and retries a 5xx.


class GatewayError(ClaudepoolError):
    """A model call the gateway did not forward, or could not deliver."""

    code = "gateway_error"
    status = 502
    # The provider's error type for this status (https://docs.anthropic.com/en/api/errors).
    anthropic_type: ClassVar[str] = "api_error"
    # The ``reason`` label it is counted under.
    reason: ClassVar[str] = "error"


class GatewayRefused(GatewayError):
    """A call the gateway refuses to forward: sending it again will not help."""

    code = "gateway_refused"
    status = 403
    anthropic_type = "permission_error"


class MissingCredential(GatewayRefused):
    """The call carried no credential (no ``x-api-key`` and no bearer token)."""

    status = 401
    anthropic_type = "authentication_error"
    reason = "missing_credential"


class UnknownCredential(GatewayRefused):
    """The credential is not one the gateway issued, or its worker has exited (it was revoked)."""

    status = 401
    anthropic_type = "authentication_error"
    reason = "unknown_credential"


class NoLease(GatewayRefused):
    """The worker holding the credential serves no request (idle, being reset): nobody to bill."""

    reason = "no_lease"


class NotInTurn(GatewayRefused):
    """The worker is leased but runs no turn: the CLI makes model calls only within a turn, so this
    call comes from something else in the worker's process tree (a tool left running)."""

    reason = "not_in_turn"


class WrongSocket(GatewayRefused):
    """A sandboxed worker's credential presented anywhere but that worker's own socket: it leaked."""

    reason = "wrong_socket"


class EndpointRefused(GatewayRefused):
    """A method or path the CLI has no business calling."""

    status = 404
    anthropic_type = "not_found_error"
    reason = "endpoint"


class GatewayRequestTooLarge(GatewayRefused):
    """The request body is over ``upstream.max_request_bytes``."""

    status = 413
    anthropic_type = "request_too_large"
    reason = "too_large"


class UpstreamUnreachable(GatewayError):
    """The provider could not be reached (connection refused or reset, DNS, TLS, connect timeout);
    the CLI retries a 5xx as it would the provider's own."""

    code = "upstream_unreachable"
    status = 502
    retryable = True
    reason = "unreachable"


class AccountCapped(GatewayError):
    """The provider account's cap (``[upstream] requests_per_minute`` / ``input_tokens_per_minute``
    times ``headroom_fraction``) is full for this call's priority: answered as the provider answers
    its own rate limit (429 ``rate_limit_error`` with ``retry-after``), so the CLI waits and retries."""

    code = "account_capped"
    status = 429
    retryable = True
    anthropic_type = "rate_limit_error"
    reason = "account_cap"


class CallOverAccountCap(GatewayRefused):
    """A call whose input-token bound alone is over the cap for its priority: it can never fit."""

    status = 413
    anthropic_type = "request_too_large"
    reason = "over_account_cap"


class CallOverBudget(GatewayRefused):
    """The tenant's budget cannot hold this model call, not even with ``max_tokens`` lowered to
    ``metering.min_call_output_tokens`` (strict), or is spent to its ``soft_stop_fraction`` (soft).
    402 ``billing_error``, which the CLI does not retry: the turn ends, and its client is answered
    `BudgetExhausted`."""

    status = 402
    anthropic_type = "billing_error"
    reason = "budget"


class CallUnpriceable(GatewayRefused):
    """A call of a tenant with a strict budget whose body gives no bound of its cost (not a JSON
    object, or no positive integer ``max_tokens``); the provider would refuse it too."""

    status = 400
    anthropic_type = "invalid_request_error"
    reason = "unbounded"


class BudgetStoreDown(GatewayError):
    """The store that holds budgets did not answer the call's reservation: budgets fail closed."""

    code = "store_unavailable"
    status = 503
    reason = "budget_store"


class UpstreamIdle(GatewayError):
    """The provider sent nothing for ``upstream.idle_timeout_s`` before its answer began (504, with
    ``x-should-retry: true``: the CLI retries it as it would the provider's own 5xx)."""

    code = "upstream_idle"
    status = 504
    retryable = True
    reason = "idle"


class BatchApiError(GatewayError):
    """The provider's Message Batches API answered an error status, or something that is not the
    answer it documents (`claudepool.gateway.batches`). ``provider_status`` and ``provider_type`` are
    the provider's HTTP status and error type when it sent one; ``transient`` says whether the same
    call may work later (429, 5xx, 529)."""

    code = "batch_api_error"
    status = 502
    reason = "batch_api"

    def __init__(self, message: str, *, provider_status: int | None = None, provider_type: str | None = None) -> None:
        super().__init__(message)
        self.provider_status = provider_status
        self.provider_type = provider_type

    @property
    def transient(self) -> bool:
        return self.provider_status is not None and (self.provider_status == 429 or self.provider_status >= 500)


class BatchWaitTimeout(BatchApiError):
    """A batch did not end within the wait's ``timeout_s`` (it goes on at the provider)."""

    code = "batch_wait_timeout"
    status = 504
    retryable = True


# -- egress: a sandboxed tool's outbound connection refused or not made --------------------------
# Answered by the egress proxy (`claudepool.gateway.egress`) to whatever runs in the sandbox, as an
# HTTP proxy's status line; counted by ``reason``.


class EgressError(ClaudepoolError):
    """A connection the egress proxy did not make."""

    code = "egress_error"
    status = 502
    reason: ClassVar[str] = "unreachable"


class EgressRefused(EgressError):
    """A connection the worker's profile does not allow: asking again will not help."""

    code = "egress_refused"
    status = 403
    reason = "not_allowed"


class EgressPrivateAddress(EgressRefused):
    """An allowed name resolved to a loopback, link-local or private address, which only an entry
    naming that address (or ``localhost``) may reach."""

    reason = "private_address"


class EgressBadRequest(EgressRefused):
    """Not a request this proxy serves: malformed, another method than CONNECT with an absolute
    ``http://`` URI, or a host that is no host name."""

    status = 400
    reason = "bad_request"


class EgressHeadTooLarge(EgressRefused):
    """The request's head (request line and headers) is over ``egress.max_head_bytes``."""

    status = 431
    reason = "head_too_large"


class EgressTooManyTunnels(EgressRefused):
    """The worker already has ``egress.max_tunnels`` connections open through the proxy."""

    status = 429
    retryable = True
    reason = "too_many_tunnels"


class EgressTimeout(EgressError):
    """The request's head, the name's resolution or the connection took too long."""

    status = 504
    retryable = True
    reason = "timeout"


# -- reconciliation: the ledger against the provider's own reports ------------------------------


class ReconcileError(ClaudepoolError):
    """`claudepool reconcile` could not read one of the two sides, so it compared nothing."""

    code = "reconcile_error"
    status = 502


class LedgerUnreadable(ReconcileError):
    """The daemon's ledger (``GET /v1/ledger``) or the ledger file could not be read, or held a record
    that is not one."""

    code = "ledger_unreadable"


class ProviderReportUnavailable(ReconcileError):
    """The provider's Admin API could not be reached, refused the admin key or the query, or answered
    something that is not a usage or cost report."""

    code = "provider_report_unavailable"


# -- config: the daemon cannot start as configured ---------------------------------------------


class ConfigError(ClaudepoolError):
    """The configuration or the service environment is invalid."""

    code = "config_error"
    status = 500
