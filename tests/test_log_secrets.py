"""No key reaches the logs, ours or a library's, even from malformed requests (issue item 5).

The process test runs a real daemon at DEBUG level and sends what makes aiohttp quote raw request
bytes in its error logs (an oversize Authorization header, a key as the request method, bad header
bytes, a long request line), slow and broken bodies, and bad socket frames, all carrying keys that
are not ``sk-ant-`` shaped as well as one that is; then it reads the daemon's whole output."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp.http_exceptions import LineTooLong

from claudepool.config import load_settings
from claudepool.daemon.app import _held_key_digests
from claudepool.logs import HumanFormatter, JsonFormatter, SecretMask, add_key_digests, mask_secrets
from tests.conftest import FAKE_CLAUDE
from tests.daemon_fixtures import DaemonProcess, start_daemon
from tests.helpers import until

__all__ = ["start_daemon"]

TENANT_KEY = "Zq7rT9pLm2xWvK4sHd01"  # the shape secrets.token_urlsafe makes: nothing says "key"
SK_TENANT_KEY = "sk-ant-api03-TeNaNtSeCrEt-55aa77"
ADMIN_KEY = "adm1n-Hh38dKs02LmQ-q"
UPSTREAM_KEY = "sk-ant-api03-UpStReAm-0099zz"
# What may remain of each: the kind of an sk-ant key (``sk-ant-api0``), nothing of the others.
SECRETS = [TENANT_KEY, SK_TENANT_KEY[11:], ADMIN_KEY, UPSTREAM_KEY[11:]]


BAD_JSON = f'{{"prompt": "x", "key": "{ADMIN_KEY}"'
H = "Host: x\r\nConnection: close\r\n"


def leaks(text: str) -> list[str]:
    """Every 8-character piece of a secret found in ``text``."""
    return sorted({s[i:i + 8] for s in SECRETS for i in range(len(s) - 7) if s[i:i + 8] in text})


async def exchange(host: str, port: int, data: bytes, *, then_wait_s: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the daemon answers until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        received = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(then_wait_s):
                while chunk := await reader.read(65536):
                    received += chunk
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def config(tmp_path: Path) -> Path:
    path = tmp_path / "claudepool.toml"
    path.write_text(f"""
[server]
socket = "{tmp_path / 'cp.sock'}"
http = "127.0.0.1:0"
admin_key = "{ADMIN_KEY}"
header_timeout_s = 1
body_timeout_s = 1
max_frame_bytes = 4096

[pool]
claude_bin = "{FAKE_CLAUDE}"
min_idle = 1
max_workers = 1
workdir = "{tmp_path / 'workers'}"

[upstream]
api_key = "{UPSTREAM_KEY}"

[sessions]
min_idle = 0
dir = "{tmp_path / 'sessions'}"

[tenants.acme]
key = "{TENANT_KEY}"

[tenants.beta]
key = "{SK_TENANT_KEY}"
""")
    return path


async def test_no_key_in_the_daemons_output_after_malformed_requests(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    daemon = await start_daemon("--config", str(config(tmp_path)), env={"CLAUDEPOOL_LOG_LEVEL": "DEBUG"})
    host, _, port_text = daemon.url.removeprefix("http://").rpartition(":")
    port = int(port_text)
    requests = [
        # Oversize headers (over aiohttp's 8190 bytes): its error quotes the value's first 100 bytes.
        f"GET /healthz HTTP/1.1\r\n{H}Authorization: Bearer {TENANT_KEY}{'A' * 9000}\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\n{H}X-Api-Key: {TENANT_KEY}{'B' * 9000}\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\n{H}Authorization: Bearer {SK_TENANT_KEY}{'C' * 9000}\r\n\r\n",
        f"GET /v1/usage?key={ADMIN_KEY}{'D' * 9000} HTTP/1.1\r\n{H}\r\n",
        # Bad request lines and header bytes: quoted whole, with a caret under the fault.
        f"{TENANT_KEY} /v1/prompt HTTP/1.1\r\n{H}\r\n",
        f"POST /v1/prompt HTTP/1.1\r\n{H}Authorization: Bearer {TENANT_KEY}\x01\r\n\r\n",
        f"POST /v1/prompt HTTP/1.1\r\n{H}{ADMIN_KEY}\r\n\r\n",
        f"POST /v1/prompt HTTP/1.1\r\n{H}X-{SK_TENANT_KEY}: 1\x7f\r\n\r\n",
        # A bad body, a chunked body that never ends and a short body, each with a good key.
        f"POST /v1/prompt HTTP/1.1\r\n{H}Authorization: Bearer {TENANT_KEY}\r\n"
        f"Content-Length: {len(BAD_JSON)}\r\n\r\n{BAD_JSON}",
        f"POST /v1/prompt HTTP/1.1\r\n{H}Authorization: Bearer {TENANT_KEY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        f"POST /v1/prompt HTTP/1.1\r\n{H}Authorization: Bearer {SK_TENANT_KEY}\r\nContent-Length: 99\r\n"
        f'\r\n{{"prompt": "{ADMIN_KEY}',
        # A head that never ends.
        f"POST /v1/prompt HTTP/1.1\r\n{H}Authorization: Bearer {TENANT_KEY}\r\n",
    ]
    answers = await asyncio.gather(*(exchange(host, port, r.encode("latin-1")) for r in requests))
    assert [a.split(b" ", 2)[1] for a in answers] == [b"400"] * 8 + [b"400", b"408", b"408", b"408"], answers
    # The socket: a frame that is not JSON, and one over max_frame_bytes, each carrying a key.
    reader, writer = await asyncio.open_unix_connection(daemon.socket)
    writer.write(f'{{"id": "1", "op": "prompt", "key": "{TENANT_KEY}", "prompt": \n'.encode())
    writer.write(orjson.dumps({"id": "2", "op": "prompt", "key": SK_TENANT_KEY, "prompt": ADMIN_KEY * 400}) + b"\n")
    async with asyncio.timeout(10):
        frames = [orjson.loads(await reader.readline()) for _ in range(2)]
    writer.close()
    assert [f["event"] for f in frames] == ["error", "error"]
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    await until(lambda: any("shutdown:" in line for line in daemon.output), 10)
    output = "".join(daemon.output)
    assert "aiohttp.server" in output and "LineTooLong" in output  # the check below reads real lines
    assert "Error handling request" in output
    assert leaks(output) == []


# -- the masking itself ------------------------------------------------------------------------------


@pytest.fixture
def held_keys() -> None:
    # The registry only grows (a daemon adds the keys it holds): these two stay masked afterwards.
    add_key_digests(hashlib.sha256(k.encode()).hexdigest() for k in (TENANT_KEY, ADMIN_KEY))


@pytest.mark.parametrize("text", [
    f"Got more than 8190 bytes when reading: b'Bearer {TENANT_KEY}AAAAAAAA...'.",
    f"b'Authorization: Bearer {TENANT_KEY}\\x01'\n                    ^",
    f"b'authorization:{TENANT_KEY}'",
    f"x-api-key: {ADMIN_KEY}",
    f'{{"id": "c1", "op": "prompt", "key": "{TENANT_KEY}", "prompt": "hi"}}',
    f"b'{TENANT_KEY} /v1/prompt HTTP/1.1'",
    f"GET /v1/usage?token={ADMIN_KEY}&x=1",
    f"connect redis://:{ADMIN_KEY}@db:6379/0 failed",
    f"upstream said {SK_TENANT_KEY} is invalid",
    f"api_key={TENANT_KEY}, password: {ADMIN_KEY}",
    f"worker stderr: using {TENANT_KEY}.",
])
def test_mask_secrets_finds_keys_by_context_by_shape_and_by_digest(held_keys: None, text: str) -> None:
    assert leaks(mask_secrets(text)) == []


def test_mask_secrets_leaves_ordinary_lines_alone(held_keys: None) -> None:
    for text in ("request", "worker retired reason=recycle_turns", "listening on http://127.0.0.1:8787",
                 "keys are hashed; monkey=banana; 5 tokens", "GET /v1/pool 200"):
        assert mask_secrets(text) == text


def test_every_part_of_a_record_is_masked_at_the_handler(held_keys: None) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretMask())
    logger = logging.getLogger("test.some.library")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"bad credentials Bearer {TENANT_KEY}")
        except ValueError:
            logger.exception("failed for %s", TENANT_KEY, extra={"fields": {"peer": f"x-api-key: {ADMIN_KEY}"}},
                             stack_info=True)
        logger.error("bad format %d", TENANT_KEY)  # a failing format call is still masked, never raised
    finally:
        logger.removeHandler(handler)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert "ValueError" in lines[0]["exception"] and "peer" in lines[0] and "stack" in lines[0]
    assert leaks(stream.getvalue()) == []
    human = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "from %s", (TENANT_KEY,), None)
    SecretMask().filter(human)
    assert leaks(HumanFormatter().format(human)) == []


def test_http_parser_errors_are_logged_without_the_bytes_they_quote() -> None:
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", None,
                               (LineTooLong, LineTooLong(f"{TENANT_KEY}BBBB", 8190), None))
    SecretMask().filter(record)
    text = JsonFormatter().format(record)
    assert "LineTooLong: HTTP 400" in text
    assert TENANT_KEY not in text


def test_uncaught_exceptions_go_through_the_masked_handler() -> None:
    """What Python prints itself (an uncaught exception) is routed through logging and masked too."""
    script = ("from claudepool.logs import configure_logging\n"
              "configure_logging('INFO', json=True)\n"
              f"raise RuntimeError('Bearer {TENANT_KEY}')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert '"uncaught exception"' in done.stderr and "RuntimeError" in done.stderr
    assert leaks(done.stderr) == []


def test_the_daemon_masks_every_key_it_holds_the_providers_admin_key_too() -> None:
    admin = "Pr0v1derAdm1n-Kq83zW"  # [upstream] admin_key: the daemon never uses it, but holds it
    settings = load_settings(None, server={"admin_key": ADMIN_KEY}, tenants={"acme": {"key": TENANT_KEY}},
                             upstream={"admin_key": admin})
    digests = _held_key_digests(settings)
    assert {hashlib.sha256(k.encode()).hexdigest() for k in (ADMIN_KEY, TENANT_KEY, admin)} <= digests


def test_a_tenants_webhook_secret_is_masked_and_never_in_a_repr() -> None:
    """The webhook secret signs the tenant's deliveries: held like a key, so masked like one."""
    secret = "whsec-Lq93Vb0XnT7eRk2"
    settings = load_settings(None, tenants={"acme": {"key": TENANT_KEY, "webhook_url": "https://hooks.example.com/cp",
                                                     "webhook_secret": secret}})
    assert secret not in repr(settings) and secret not in repr(settings.tenants["acme"])
    assert secret not in str(settings.model_dump())  # a dump keeps it a SecretStr
    digests = _held_key_digests(settings)
    assert hashlib.sha256(secret.encode()).hexdigest() in digests
    add_key_digests(digests)
    assert secret not in mask_secrets(f"signing for acme with {secret} failed")
