"""What both front doors do alike around one request: read and parse its body, and run it through
the service path, turning whatever fails into the front door's own error answer: a plain HTTP
error before the stream opened, an error in the stream after."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from claudepool.errors import BadRequest, ClaudepoolError, PromptTooLarge
from claudepool.protocol.wire import PromptRequest, PromptResult, StreamItem, describe_validation_error
from claudepool.tenancy.models import DEFAULT_MODEL, ModelCatalog, resolve_model
from claudepool.tenancy.routing import Router
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

# A request's kind (README, "Routing"): the SDKs' typed ``metadata`` takes no field of ours, so a
# client sends it in this header (``default_headers``/``extra_headers``) or as a body field
# ``kind`` (``extra_body``).
KIND_HEADER = "x-claudepool-kind"

M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PromptTooLarge("request body too large") from None


def kind_of(request: web.Request, body_kind: str | None) -> str | None:
    """The request's kind: the header's or the body's (both given must agree)."""
    header = request.headers.get(KIND_HEADER, "").strip() or None
    if header is not None and body_kind is not None and header != body_kind:
        raise BadRequest(f"the {KIND_HEADER} header and the body's kind differ")
    chosen = header or body_kind
    if chosen is not None and not 1 <= len(chosen) <= 64:
        raise BadRequest(f"invalid request: kind: 1 to 64 characters ({KIND_HEADER})")
    return chosen


def asked_model(model: str) -> str | None:
    """The body's model, where ``"default"`` names none (the route's, the tier's or the profile's)."""
    return None if resolve_model(model) == DEFAULT_MODEL else model


def served_as(router: Router, catalog: ModelCatalog, tenant: Tenant, kind: str | None,
              model: str | None) -> tuple[str, str]:
    """The profile the request runs on and the model it is served by, as admission will resolve them
    (`Router`): what the system prompt is checked against, and what ``message_start`` names before
    the CLI reports the model in force. Raises `UnknownKind`."""
    routed = router.resolve(tier=tenant.tier, kind=kind, profile=None, model=model)
    profile = routed.profile or tenant.profile
    return profile, resolve_model(routed.model) if routed.model is not None else catalog.profile_model(profile)


def parse(model: type[M], raw: bytes) -> M:
    """The body as ``model``, or `BadRequest` naming what is wrong (never a value)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


def failed(answer: PromptResult) -> ClaudepoolError:
    """A turn that ended in error (the CLI's model call failed after its retries)."""
    return ClaudepoolError(f"the model call failed: {answer.text[:500]}")


Handle = Callable[..., Awaitable[PromptResult]]


async def serve(request: web.Request, handle: Handle, key: str | None, read: Callable[[], Awaitable[PromptRequest]],
                on_event: Callable[[StreamItem], Awaitable[None]], request_id: str, *,
                stream: Callable[[], web.StreamResponse | None],
                error_response: Callable[[ClaudepoolError, str], web.Response],
                error_in_stream: Callable[[ClaudepoolError], bytes]) -> PromptResult | web.StreamResponse:
    """The answer, or the response that already told the client why there is none."""
    try:
        answer = await handle(key, read, on_event, request_id=request_id)
        if answer.is_error:
            raise failed(answer)
        return answer
    except Exception as exc:
        opened = stream()
        if not isinstance(exc, ClaudepoolError):
            if opened is not None and isinstance(exc, ConnectionResetError):
                return opened  # the client left: nothing to tell anyone
            log.exception("unhandled error in %s %s", request.method, request.path)
            exc = ClaudepoolError("internal error")
        if opened is None:
            return error_response(exc, request_id)
        with contextlib.suppress(ConnectionResetError):
            await opened.write(error_in_stream(exc))
            await opened.write_eof()
        return opened
