#!/usr/bin/env python3
"""A real MCP upstream server for the gateway tests, written with the official SDK (mcp==2.3.0).

    python3 upstream.py stdio NAME
    python3 upstream.py http  NAME PORT      # streamable HTTP on 127.0.0.1:PORT, path /mcp

NAME is the server's name (serverInfo.name and the "server" field of whoami); it is not
prepended to any tool: the gateway does the namespacing.

Tools, always present:
    echo(text)            -> text
    add(a, b)             -> a + b (text "3", structuredContent {"result": 3})
    create_issue(title)   -> "created issue: TITLE"
    delete_repo(name)     -> "deleted repo: NAME"
    whoami()              -> JSON text {"server": NAME, "mode": "http"|"stdio", "credential": ...}
                             http: the Authorization header as received (or null)
                             stdio: env UPSTREAM_TOKEN (or null)
    crash()               -> the process exits at once with status 3 (no reply)
    mutate()              -> adds a tool `added_K` (K = 1, 2, ...) and sends
                             notifications/tools/list_changed (GET stream / session for
                             2025-*, subscriptions/listen bus for 2026-07-28)
Plus tool_0000 .. tool_{N-1} when env MCP_TOOL_COUNT=N; each returns JSON text
{"tool": "tool_0007", "args": {...}}.

Resources: file:///readme.txt ("readme of NAME"), file:///secret.txt ("secret of NAME").
Prompts:   greet(name="world"), admin_reset().

Env:
    MCP_TOOL_COUNT=N     extra tools (default 0)
    MCP_PAGE_SIZE=K      paginate tools/list, resources/list, prompts/list K items a page;
                         cursor is the decimal offset; a bad cursor is -32602 (default: one page)
    UPSTREAM_TOKEN=T     http: every request needs `Authorization: Bearer T` (else 401);
                         stdio: reported by whoami
    MCP_WIRE_LOG=PATH    http: append every raw HTTP request/response (JSON lines) to PATH
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, ListPromptsResult, ListResourcesResult, ListToolsResult


def _page(items: list[Any], cursor: str | None) -> tuple[list[Any], str | None]:
    size = int(os.environ.get("MCP_PAGE_SIZE", "0") or 0)
    if size <= 0:
        if cursor is not None:
            raise MCPError(code=INVALID_PARAMS, message="Invalid cursor")
        return items, None
    try:
        start = int(cursor) if cursor is not None else 0
        if start < 0 or start > len(items) or str(start) != cursor and cursor is not None:
            raise ValueError
    except ValueError:
        raise MCPError(code=INVALID_PARAMS, message="Invalid cursor") from None
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


class Upstream(MCPServer):
    async def _handle_list_tools(self, ctx, params):  # type: ignore[override]
        tools, nxt = _page(await self.list_tools(), params.cursor if params else None)
        return ListToolsResult(tools=tools, next_cursor=nxt)

    async def _handle_list_resources(self, ctx, params):  # type: ignore[override]
        res, nxt = _page(await self.list_resources(), params.cursor if params else None)
        return ListResourcesResult(resources=res, next_cursor=nxt)

    async def _handle_list_prompts(self, ctx, params):  # type: ignore[override]
        prompts, nxt = _page(await self.list_prompts(), params.cursor if params else None)
        return ListPromptsResult(prompts=prompts, next_cursor=nxt)


def build(name: str, mode: str) -> Upstream:
    mcp = Upstream(name=name, version="1.0.0", log_level="WARNING")
    added = {"n": 0}

    @mcp.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    def create_issue(title: str) -> str:
        """Create an issue (fake)."""
        return f"created issue: {title}"

    @mcp.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository (fake, dangerous)."""
        return f"deleted repo: {name}"

    @mcp.tool()
    def whoami(ctx: Context) -> str:
        """Return the credential this server received."""
        if mode == "http":
            headers = ctx.headers or {}
            cred = headers.get("authorization")
        else:
            cred = os.environ.get("UPSTREAM_TOKEN")
        return json.dumps({"server": name, "mode": mode, "credential": cred})

    @mcp.tool()
    def crash() -> str:
        """Exit the server process immediately."""
        sys.stdout.flush()
        os._exit(3)

    @mcp.tool()
    async def mutate(ctx: Context) -> str:
        """Add a tool and announce notifications/tools/list_changed."""
        added["n"] += 1
        new = f"added_{added['n']}"

        def _added() -> str:
            return new

        mcp.add_tool(_added, name=new, description="added at runtime")
        try:  # 2025-*: over the session (HTTP: the standalone GET stream)
            await ctx.session.send_tool_list_changed()
        except Exception:
            pass
        try:  # 2026-07-28: subscriptions/listen bus
            await ctx.notify_tools_changed()
        except Exception:
            pass
        return new

    for i in range(int(os.environ.get("MCP_TOOL_COUNT", "0") or 0)):
        tool_name = f"tool_{i:04d}"

        def make(tn: str):
            def f(text: str = "", n: int = 0) -> str:
                return json.dumps({"tool": tn, "args": {"text": text, "n": n}})

            return f

        mcp.add_tool(make(tool_name), name=tool_name, description=f"generated tool {tool_name}")

    @mcp.resource("file:///readme.txt", name="readme", mime_type="text/plain")
    def readme() -> str:
        return f"readme of {name}"

    @mcp.resource("file:///secret.txt", name="secret", mime_type="text/plain")
    def secret() -> str:
        return f"secret of {name}"

    @mcp.prompt()
    def greet(name: str = "world") -> str:
        """Greet someone."""
        return f"Hello, {name}!"

    @mcp.prompt()
    def admin_reset() -> str:
        """Reset everything (admin only)."""
        return "Reset all the things."

    return mcp


class Guard:
    """ASGI wrapper: bearer check (UPSTREAM_TOKEN) and optional raw wire log (MCP_WIRE_LOG)."""

    def __init__(self, app: Any, token: str | None, log_path: str | None):
        self.app, self.token, self.log_path = app, token, log_path

    def _log(self, rec: dict[str, Any]) -> None:
        if self.log_path:
            rec["t"] = round(time.time(), 4)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"{id(scope):x}"
        hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = bytearray()

        async def recv() -> Any:
            msg = await receive()
            if msg["type"] == "http.request":
                body.extend(msg.get("body", b""))
                if not msg.get("more_body") and self.log_path:
                    self._log({"id": rid, "dir": "req", "method": scope["method"], "path": scope["path"],
                               "headers": hdrs, "body": body.decode("utf-8", "replace")})
            return msg

        async def snd(msg: Any) -> None:
            if self.log_path:
                if msg["type"] == "http.response.start":
                    self._log({"id": rid, "dir": "resp", "status": msg["status"],
                               "headers": {k.decode(): v.decode() for k, v in msg.get("headers", [])}})
                elif msg["type"] == "http.response.body" and msg.get("body"):
                    self._log({"id": rid, "dir": "chunk", "body": msg["body"].decode("utf-8", "replace")})
            await send(msg)

        if self.token is not None and hdrs.get("authorization") != f"Bearer {self.token}":
            if self.log_path:
                self._log({"id": rid, "dir": "req", "method": scope["method"], "path": scope["path"],
                           "headers": hdrs, "body": None})
            payload = b'{"error":"unauthorized"}'
            await snd({"type": "http.response.start", "status": 401,
                       "headers": [(b"content-type", b"application/json"),
                                   (b"www-authenticate", b"Bearer"),
                                   (b"content-length", str(len(payload)).encode())]})
            await snd({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, recv, snd)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("stdio", "http") or (sys.argv[1] == "http" and len(sys.argv) < 4):
        sys.exit("usage: upstream.py stdio NAME | upstream.py http NAME PORT")
    mode, name = sys.argv[1], sys.argv[2]
    mcp = build(name, mode)
    if mode == "stdio":
        mcp.run("stdio")
        return
    import uvicorn

    port = int(sys.argv[3])
    app = mcp.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    app = Guard(app, os.environ.get("UPSTREAM_TOKEN"), os.environ.get("MCP_WIRE_LOG"))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve)


if __name__ == "__main__":
    main()
