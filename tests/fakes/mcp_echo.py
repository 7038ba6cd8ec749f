"""A minimal MCP server on stdio (newline-delimited JSON-RPC 2.0), for the MCP-per-profile tests.

One tool, ``shout``: answers its ``text`` upper-cased, with what the server sees of itself (its
pid, its uid, whether /proc shows the host's processes), so a test knows where it runs. Standard
library only: in a sandbox it runs with the system's python3."""

from __future__ import annotations

import json
import os
import sys

TOOL = {"name": "shout", "description": "Answer the text upper-cased.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def answer(request: dict[str, object]) -> dict[str, object] | None:
    method, params = request.get("method"), request.get("params") or {}
    assert isinstance(params, dict)
    if method == "initialize":
        result: object = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                          "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [TOOL]}
    elif method == "tools/call":
        text = str((params.get("arguments") or {}).get("text", ""))
        seen = f"pid={os.getpid()} uid={os.getuid()} procs={sum(p.isdigit() for p in os.listdir('/proc'))}"
        result = {"content": [{"type": "text", "text": f"{text.upper()} MCP-ECHO {seen}"}]}
    elif "id" not in request:
        return None  # a notification (notifications/initialized, …)
    else:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": f"no method {method}"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            reply = answer(json.loads(line))
            if reply is not None:
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
