"""MCP servers per profile: what ``profiles.NAME.mcp_servers`` holds, and the CLI arguments it becomes.

A profile's workers start its MCP servers once, at spawn, and keep them connected across leases
(the point of a warm worker); ``--strict-mcp-config`` makes them the only ones: no user, project
or ``.mcp.json`` configuration a tenant's tool could write into the workspace is read. A stdio
server runs as a child of the CLI, so in a sandboxed profile it runs inside the sandbox, under its
bounds: its files must be visible there (``sandbox_read_only``). An http or sse server is reached
like any outbound host: through ``allowed_hosts`` when sandboxed.

>>> servers = {"docs": McpServer(command="/usr/bin/python3", args=("/opt/docs/server.py",))}
>>> mcp_args(servers)[0], mcp_args(servers)[-1]
('--mcp-config', '--strict-mcp-config')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator


class McpServer(BaseModel):
    """One server, in the CLI's ``mcpServers`` format."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["stdio", "http", "sse"] = "stdio"
    command: str | None = None  # stdio: the program, by absolute path (the sandbox has no $HOME bin)
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = Field(default_factory=dict)
    url: str | None = None  # http and sse
    headers: Mapping[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if self.type == "stdio" and (not self.command or self.url is not None or self.headers):
            raise ValueError("a stdio MCP server has a command (and no url or headers)")
        if self.type != "stdio" and (not self.url or self.command is not None or self.args or self.env):
            raise ValueError(f"an {self.type} MCP server has a url (and no command, args or env)")
        return self

    def config(self) -> dict[str, object]:
        if self.type == "stdio":
            return {"type": "stdio", "command": self.command, "args": list(self.args), "env": dict(self.env)}
        return {"type": self.type, "url": self.url, "headers": dict(self.headers)}


def mcp_args(servers: Mapping[str, McpServer]) -> list[str]:
    """The CLI arguments for ``servers``: one JSON ``--mcp-config`` and ``--strict-mcp-config``; none
    without servers."""
    if not servers:
        return []
    config = {"mcpServers": {name: server.config() for name, server in sorted(servers.items())}}
    return ["--mcp-config", orjson.dumps(config).decode(), "--strict-mcp-config"]
