"""MCP servers and structured output per profile without a CLI: the settings' rules and the command line
(tests/test_real_cli_mcp.py runs a server under the real CLI)."""

from __future__ import annotations

import orjson
import pytest

from claudepool.config import load_settings
from claudepool.errors import ConfigError

ECHO = {"command": "/usr/bin/python3", "args": ["/opt/echo.py"], "env": {"LEVEL": "1"}}


def test_mcp_servers_become_one_strict_config_and_sandbox_the_profile() -> None:
    settings = load_settings(None, profiles={"default": {"mcp_servers": {"echo": ECHO, "docs": {
        "type": "http", "url": "https://docs.example.com/mcp"}}}})
    profile = settings.profile("default")
    argv = profile.argv()
    config = orjson.loads(argv[argv.index("--mcp-config") + 1])
    assert config == {"mcpServers": {
        "docs": {"type": "http", "url": "https://docs.example.com/mcp", "headers": {}},
        "echo": {"type": "stdio", "command": "/usr/bin/python3", "args": ["/opt/echo.py"], "env": {"LEVEL": "1"}}}}
    assert "--strict-mcp-config" in argv  # no other MCP configuration is read
    assert profile.sandboxed  # no tools, but its servers run code
    plain = load_settings(None, profiles={"default": {}}).profile("default")
    assert "--mcp-config" not in plain.argv() and not plain.sandboxed


@pytest.mark.parametrize(("server", "message"), [
    ({"args": ["x"]}, "a stdio MCP server has a command"),
    ({"type": "http", "command": "/bin/x", "url": "https://x"}, "an http MCP server has a url"),
    ({"type": "sse"}, "an sse MCP server has a url"),
    ({"command": "/bin/x", "transport": "pipe"}, "Extra inputs are not permitted"),
])
def test_a_server_has_exactly_one_transport(server: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, profiles={"default": {"mcp_servers": {"s": server}}})


@pytest.mark.parametrize("args", [["--mcp-config", "{}"], ["--strict-mcp-config"], ["--mcp-config={}"]])
def test_no_other_mcp_config_slips_in_through_args(args: list[str]) -> None:
    with pytest.raises(ConfigError, match="may not contain --"):
        load_settings(None, profiles={"default": {"args": args}})


@pytest.mark.parametrize("path", ["relative/dir", "/opt/../etc", "/", "/opt/x/"])
def test_sandbox_read_only_paths_are_absolute_and_plain(path: str) -> None:
    with pytest.raises(ConfigError, match="sandbox_read_only"):
        load_settings(None, profiles={"default": {"tools": ["Bash"], "sandbox_read_only": [path]}})


def test_a_json_schema_effort_and_fallback_models_become_the_clis_flags() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    argv = load_settings(None, profiles={"default": {
        "json_schema": schema, "effort": "high", "fallback_models": ["claude-sonnet-4-5", "claude-haiku-4-5"]}}
    ).profile("default").argv()
    assert orjson.loads(argv[argv.index("--json-schema") + 1]) == schema
    assert argv[argv.index("--effort") + 1] == "high"
    assert argv[argv.index("--fallback-model") + 1] == "claude-sonnet-4-5,claude-haiku-4-5"
    with pytest.raises(ConfigError, match="effort"):
        load_settings(None, profiles={"default": {"effort": "extreme"}})
