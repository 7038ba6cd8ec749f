"""Spawn settings for a family of interchangeable workers, with a safe default.

A `Profile` says how to start `claude`: binary, model, system prompt, tools, extra arguments and
environment. Every worker of a profile is started the same way, so any of them can serve any request
made for that profile once its conversation is reset.

The defaults are the safe ones (DESIGN.md part 2): no tools, no session files, no auto-memory, no
CLAUDE.md discovery, no telemetry or update traffic, a per-worker private HOME/TMPDIR/cwd (added by
the worker), and few upstream retries so a failing upstream costs seconds, not minutes.

>>> p = Profile(name="lean", system_prompt="Answer briefly.", env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
>>> "--tools" in p.argv() and p.argv()[p.argv().index("--tools") + 1] == ""
True
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from claudepool.pool import hosts
from claudepool.pool.mcp import McpServer, mcp_args

# What a worker may inherit from the daemon's environment. Everything else (API keys, Redis URLs,
# admin keys, NOTIFY_SOCKET, LISTEN_FDS, CLAUDE_* settings) is dropped: workers start clean.
INHERITED_ENV = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
    "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
)  # fmt: skip

QUIET_ENV = {
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    # Auto-memory is injected into every prompt and survives /clear: a cross-tenant channel.
    "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
}

# Variables that decide where a worker's model calls go and with what credential. With a gateway
# (`Worker`'s ``credentials``) the worker gets the gateway's address and its own credential instead,
# and any of these the profile sets is dropped: a worker never holds the provider's key, and none can
# route around the gateway (to Bedrock, Vertex or another URL).
UPSTREAM_ENV = frozenset({
    "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_BEDROCK_BASE_URL", "ANTHROPIC_VERTEX_BASE_URL", "ANTHROPIC_FOUNDRY_BASE_URL",
    "ANTHROPIC_FOUNDRY_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "AWS_BEARER_TOKEN_BEDROCK",
})  # fmt: skip
_UPSTREAM_WORDS = ("KEY", "TOKEN", "URL", "HEADERS", "SECRET")


def routes_upstream(name: str) -> bool:
    """True for a variable that carries a provider credential or address, or picks another provider
    (``CLAUDE_CODE_USE_BEDROCK``, ``…_VERTEX``, ``…_FOUNDRY``): what only the gateway may hold.

    >>> [routes_upstream(n) for n in ("ANTHROPIC_API_KEY", "ANTHROPIC_MODEL", "CLAUDE_CODE_USE_VERTEX")]
    [True, False, True]
    """
    upper = name.upper()
    return (upper in UPSTREAM_ENV or upper.startswith("CLAUDE_CODE_USE_")
            or (upper.startswith("ANTHROPIC_") and any(word in upper for word in _UPSTREAM_WORDS)))


# A pool made on demand (`claudepool.daemon.pools`) is named after its base profile's pool, with "~"
# and 16 hex digits of its spawn key inserted after the profile's name ("default~0123456789abcdef",
# "default~0123456789abcdef.sessions"): unique, of bounded length, and never the system prompt itself.
ON_DEMAND_MARK = "~"
_ON_DEMAND_KEY = re.compile(r"~[0-9a-f]{16}")


def pool_label(name: str) -> str:
    """The bounded name metrics show for pool ``name``: an on-demand pool's key becomes ``custom``, so
    every on-demand pool of a profile counts under one label, however many prompts arrive.

    >>> pool_label("default~0123456789abcdef.sessions"), pool_label("default")
    ('default~custom.sessions', 'default')
    """
    return _ON_DEMAND_KEY.sub("~custom", name)


def pool_labels(profile: str) -> tuple[str, ...]:
    """Every label the pools of configured profile ``profile`` are counted under (`pool_label`)."""
    return profile, f"{profile}.sessions", f"{profile}~custom", f"{profile}~custom.sessions"


def configured_pool(name: str) -> str:
    """The configured pool an on-demand pool ``name`` derives from (its upstream is that one's).

    >>> configured_pool("default~0123456789abcdef.sessions"), configured_pool("lean")
    ('default.sessions', 'lean')
    """
    return _ON_DEMAND_KEY.sub("", name)


# Arguments that would break how a worker is driven or reset.
_FORBIDDEN_ARGS = frozenset({"--disable-slash-commands", "--input-format", "--output-format", "-p", "--print",
                            # set by permission_mode, where the sandbox is checked
                            "--permission-mode", "--dangerously-skip-permissions",
                            "--allow-dangerously-skip-permissions",
                            # set by mcp_servers: no other MCP configuration may slip in beside it
                            "--mcp-config", "--strict-mcp-config"})


class SpawnSettings(BaseModel):
    """How a profile's workers start, as a ``[profiles.NAME]`` section sets it too: declared once here,
    and shared by `Profile` and the configuration's section model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    system_prompt: str | None = None
    # Tools the model may use; empty means none (`--tools ""`), the safe default.
    tools: tuple[str, ...] = ()
    # Each worker in an OS sandbox (`claudepool.pool.sandbox`); unset: when it has tools or MCP servers.
    sandbox: bool | None = None
    # The CLI's permission mode and tool allow/deny lists (--permission-mode, --allowedTools,
    # --disallowedTools). bypassPermissions only inside a sandbox.
    permission_mode: Literal["default", "acceptEdits", "plan", "dontAsk", "bypassPermissions"] | None = None
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()
    # Bounds on each sandboxed worker: its CLI and every process its tools start (tasks: threads
    # count), its memory (both by cgroup where the daemon has one, `claudepool.pool.cgroups`), and
    # what its HOME, TMPDIR and workspace hold on disk (no file past it; the lease ends beyond it).
    max_processes: int | None = Field(default=256, ge=64)
    max_memory_bytes: int | None = Field(default=2 * 1024**3, ge=256 * 1024**2)
    max_workspace_bytes: int | None = Field(default=1024**3, ge=1024**2)
    # Outbound hosts a sandboxed worker may reach through the daemon's egress proxy (``host``,
    # ``host:port``, ``*.example.com``; `claudepool.pool.hosts`). Empty: no egress at all.
    allowed_hosts: tuple[str, ...] = ()
    # ``--effort`` (the model's reasoning effort), and ``--fallback-model``: models to go on with,
    # in order, while the profile's model is busy (a turn that does says so: ``model_fallback``).
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    fallback_models: tuple[str, ...] = ()
    # Structured output (``--json-schema``): every answer is a JSON value of this schema, validated
    # by the CLI, returned as the answer's ``structured_output``.
    json_schema: Mapping[str, Any] | None = None
    # MCP servers the workers start and keep connected (`claudepool.pool.mcp`): the only ones they use.
    mcp_servers: Mapping[str, McpServer] = Field(default_factory=dict)
    # Host paths a sandboxed worker sees read-only beside the system and the CLI (an MCP server's files).
    sandbox_read_only: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    # Text deltas as they arrive (`stream_event` lines); needed to stream answers to clients.
    include_partial_messages: bool = True
    # CLAUDE.md files in the cwd and its parents would reach every tenant's prompt.
    read_claude_md: bool = False
    # `--bare`: no hooks, LSP, plugin sync, background prefetches, keychain or OAuth; API-key auth
    # only. About 20% less CPU per turn and per reset. Turn off to use subscription (OAuth) login.
    bare: bool = True
    upstream_max_retries: int = Field(default=2, ge=0)
    upstream_timeout_ms: int = Field(default=60_000, gt=0)

    @property
    def sandboxed(self) -> bool:
        # An MCP server runs code that tenants' prompts drive, as a tool does.
        return self.sandbox if self.sandbox is not None else bool(self.tools or self.mcp_servers)

    @model_validator(mode="after")
    def _bypass_only_sandboxed(self) -> SpawnSettings:
        if self.permission_mode == "bypassPermissions" and not self.sandboxed:
            raise ValueError("permission_mode bypassPermissions needs the sandbox: a tool could do anything "
                             "the daemon's user can")
        return self

    @model_validator(mode="after")
    def _egress_only_sandboxed(self) -> SpawnSettings:
        if self.allowed_hosts and not self.sandboxed:
            raise ValueError("allowed_hosts needs the sandbox: an unsandboxed worker reaches every host already")
        return self

    @field_validator("allowed_hosts")
    @classmethod
    def _host_entries(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        # Each in its canonical spelling, so the one the proxy matches is the one the config shows.
        return tuple(dict.fromkeys(str(hosts.parse_entry(entry)) for entry in entries))

    @field_validator("sandbox_read_only")
    @classmethod
    def _absolute(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not os.path.isabs(path) or os.path.normpath(path) != path or path == "/":
                raise ValueError(f"sandbox_read_only takes absolute, normalised paths below /, got {path!r}")
        return paths

    @field_validator("tools", "allowed_tools", "disallowed_tools", "allowed_hosts", "args", "sandbox_read_only",
                     "fallback_models", mode="before")
    @classmethod
    def _an_array(cls, value: object) -> object:
        # Kept as tuples (a profile is immutable), but written as TOML arrays: name them as such.
        if not isinstance(value, list | tuple):
            raise PydanticCustomError("list_type", "Input should be a valid list")
        return value

    @field_validator("args")
    @classmethod
    def _no_forbidden_args(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        bad = sorted({a.split("=", 1)[0] for a in args} & _FORBIDDEN_ARGS)
        if bad:
            raise ValueError(f"profile args may not contain {', '.join(bad)}: workers would break")
        return args


class Profile(SpawnSettings):
    """How to start the workers of one pool."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    claude_bin: str = "claude"
    env: Mapping[str, str] = Field(default_factory=dict)
    # --max-budget-usd: the CLI ends a conversation (a request, since each is reset) that costs more.
    max_budget_usd: float | None = Field(default=None, gt=0)
    # Transcripts on disk, so a conversation can be resumed elsewhere (--resume). Only the
    # session-capable variant of a profile turns this on; stateless workers write nothing.
    session_persistence: bool = False

    @property
    def label(self) -> str:
        """This pool's name as metrics show it (`pool_label`)."""
        return pool_label(self.name)

    def session_variant(self) -> Profile:
        """The same spawn settings with transcripts kept, for conversations."""
        return self.model_copy(update={"name": f"{self.name}.sessions", "session_persistence": True})

    def with_args(self, *extra: str) -> Profile:
        return self.model_copy(update={"args": (*self.args, *extra)})

    def argv(self) -> list[str]:
        """The full command line of a worker."""
        argv = [
            self.claude_bin, "-p",
            "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
            # Keeps HOME and cwd out of the system prompt, so every worker of a profile shares one
            # prompt-cache prefix even though each has a private HOME.
            "--exclude-dynamic-system-prompt-sections",
            "--tools", ",".join(self.tools),
        ]  # fmt: skip
        if not self.session_persistence:
            argv.append("--no-session-persistence")
        if self.bare:
            argv.append("--bare")
        if self.include_partial_messages:
            argv.append("--include-partial-messages")
        if self.model:
            argv += ["--model", self.model]
        if self.system_prompt is not None:
            argv += ["--system-prompt", self.system_prompt]
        if self.max_budget_usd is not None:
            argv += ["--max-budget-usd", f"{self.max_budget_usd:g}"]
        if self.permission_mode is not None:
            argv += ["--permission-mode", self.permission_mode]
        if self.allowed_tools:
            argv += ["--allowedTools", ",".join(self.allowed_tools)]
        if self.disallowed_tools:
            argv += ["--disallowedTools", ",".join(self.disallowed_tools)]
        if self.effort is not None:
            argv += ["--effort", self.effort]
        if self.fallback_models:
            argv += ["--fallback-model", ",".join(self.fallback_models)]
        if self.json_schema is not None:
            argv += ["--json-schema", orjson.dumps(self.json_schema).decode()]
        argv += mcp_args(self.mcp_servers)
        argv += self.args
        return argv

    def environ(self, *, home: Path, tmpdir: Path, inherited: Mapping[str, str] | None = None,
                upstream: Mapping[str, str] | None = None) -> dict[str, str]:
        """The worker's whole environment: a scrubbed base, quiet settings, the profile, private dirs.

        ``upstream`` (the gateway's address and this worker's credential) replaces every variable of
        the profile's that `routes_upstream`; without it the profile's own are used as they are."""
        source = os.environ if inherited is None else inherited
        env = {k: source[k] for k in INHERITED_ENV if k in source}
        env.update(QUIET_ENV)
        env["CLAUDE_CODE_MAX_RETRIES"] = str(self.upstream_max_retries)
        env["API_TIMEOUT_MS"] = str(self.upstream_timeout_ms)
        if not self.read_claude_md:
            env["CLAUDE_CODE_DISABLE_CLAUDE_MDS"] = "1"
        if upstream is None:
            env.update(self.env)
        else:
            env.update({k: v for k, v in self.env.items() if not routes_upstream(k)})
            env.update(upstream)
        # Private directories are not the profile's to override.
        env["HOME"] = str(home)
        env["TMPDIR"] = str(tmpdir)
        for var, sub in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"),
                         ("XDG_DATA_HOME", ".local/share"), ("XDG_STATE_HOME", ".local/state")):
            env[var] = str(home / sub)
        return env
