#!/usr/bin/env python3
"""MCP test driver for the gateway tests, built on the official SDK (mcp==2.3.0).

    python3 client.py CASE URL [ARGS...]

Prints exactly ONE JSON object on stdout (last line) and exits 0, also for expected protocol
errors, which appear as {"error": {"code": INT|null, "message": STR}, ...}. Exit 2 = usage.

VERSION (optional everywhere it appears):
    2025-06-18 | 2025-11-25   initialize handshake offering that version (session + Mcp-Session-Id)
    2026-07-28                server/discover, then the stateless per-request envelope
    auto (default)            the SDK's own choice: discover, falling back to initialize

Cases:
    list_tools [VERSION]               {"version", "names": [...], "pages": N, "session_id"}
    call NAME JSON_ARGS [VERSION]      {"version", "isError", "text", "content", "structuredContent"}
    resources [VERSION]                {"version", "uris": [...], "names": [...], "read": {uri: text | {"error"}},
                                        "read_uris": {uri: [uri of each content]}}
    prompts [VERSION]                  {"version", "names": [...], "get": {name: text | {"error"}}}
    session [VERSION] [HOLD_SECS]      {"version", "session_id"}; the session is NOT deleted
                                       (HOLD_SECS: keep the process and its streams alive so long)
    replay SESSION_ID [VERSION]        raw tools/list POST with that Mcp-Session-Id (httpx2):
                                       {"status", "headers", "body"}
    watch SECONDS [VERSION] [TRIGGER]  session, tools/list, then wait up to SECONDS for
                                       notifications/tools/list_changed; prints "READY <sid>" on
                                       STDERR once listening. TRIGGER: a tool this same session
                                       calls after READY (e.g. `mutate` when testing directly).
                                       {"version", "session_id", "before", "arrived", "after", "waited_ms",
                                        "via": ["listen"] (2026: on the subscriptions/listen stream)
                                               | ["message_handler"] (2025-*: any stream),
                                        "get_stream": bool (2025-*: GET SSE stream got 200)}
    raw BODY HEADERS_JSON              httpx2 request with BODY sent verbatim (not re-encoded).
                                       Default headers: Content-Type application/json, Accept
                                       "application/json, text/event-stream"; HEADERS_JSON overrides
                                       them (null removes one). Special keys: ":method" (POST|GET|
                                       DELETE|...), ":timeout" (secs to read an SSE body, default 3).
                                       BODY "@pad:N" = a valid tools/list request padded to >= N bytes.
                                       {"status", "headers", "body", "sse"}
    raw output also carries "error": {"code","message"} when the body is a JSON-RPC error, and
    "names" when it is a tools/list result. For SSE bodies "body" is the LAST event (the response).
URL may also be "stdio:python3 upstream.py stdio NAME" (SDK stdio transport; for direct smoke
tests of upstream.py; session_id is then null).
Env: MCP_BEARER=T adds `Authorization: Bearer T` to every request (all cases).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx2
import mcp.client.session as _client_session
import mcp_types as types
from mcp.client._probe import negotiate_auto
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import listen
from mcp.shared.exceptions import MCPError

HANDSHAKE = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
INTERESTING = ("content-type", "mcp-session-id", "mcp-protocol-version", "www-authenticate", "allow",
               "cache-control", "content-length", "location")


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def err_obj(exc: BaseException) -> dict[str, Any]:
    # anyio task groups wrap errors; report the most telling leaf.
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    boring = (anyio.get_cancelled_exc_class(), GeneratorExit)
    exc = next((e for e in leaves if isinstance(e, MCPError)), None) \
        or next((e for e in leaves if not isinstance(e, boring)), None) or (leaves[0] if leaves else exc)
    if isinstance(exc, MCPError):
        e = {"code": exc.error.code, "message": exc.error.message}
        if exc.error.data is not None:
            e["data"] = exc.error.data
        return {"error": e}
    if isinstance(exc, httpx2.HTTPStatusError):
        return {"error": {"code": None, "message": str(exc), "http_status": exc.response.status_code}}
    return {"error": {"code": None, "message": f"{type(exc).__name__}: {exc}"}}


def auth_headers() -> dict[str, str]:
    tok = os.environ.get("MCP_BEARER")
    return {"Authorization": f"Bearer {tok}"} if tok else {}


class Conn:
    """One SDK ClientSession over streamable HTTP, with the session id captured from responses."""

    def __init__(self, url: str, version: str | None, *, keep: bool = False, handler: Any = None):
        self.url, self.version, self.keep, self.handler = url, (version or "auto"), keep, handler
        self.session_id: str | None = None
        self.get_open = anyio.Event()  # set when the standalone GET SSE stream answered 200
        self.stack = AsyncExitStack()

    async def _hook(self, resp: httpx2.Response) -> None:
        sid = resp.headers.get("mcp-session-id")
        if sid:
            self.session_id = sid
        if resp.request.method == "GET" and resp.status_code == 200:
            self.get_open.set()

    async def __aenter__(self) -> ClientSession:
        try:
            return await self._open()
        except BaseException:
            # `async with` does not call __aexit__ when __aenter__ fails: unwind here so the
            # transport's task group reports the real cause (e.g. ConnectError).
            await self.stack.__aexit__(*sys.exc_info())
            raise

    async def _open(self) -> ClientSession:
        http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(30.0, read=300.0),
            headers=auth_headers(),
            event_hooks={"response": [self._hook]},
        )
        await self.stack.enter_async_context(http)
        if self.url.startswith("stdio:"):
            # Direct smoke tests only: "stdio:python3 upstream.py stdio NAME" (env is inherited).
            argv = shlex.split(self.url[len("stdio:"):])
            params = StdioServerParameters(command=argv[0], args=argv[1:], env=dict(os.environ))
            read, write = await self.stack.enter_async_context(stdio_client(params))
        else:
            read, write = await self.stack.enter_async_context(
                streamable_http_client(self.url, http_client=http, terminate_on_close=not self.keep)
            )
        kwargs: dict[str, Any] = {"read_timeout_seconds": 60.0}
        if self.handler is not None:
            kwargs["message_handler"] = self.handler
        s = await self.stack.enter_async_context(ClientSession(read, write, **kwargs))
        self.session = s
        v = self.version
        if v in HANDSHAKE:
            # ClientSession.initialize() always offers LATEST_HANDSHAKE_VERSION; pin the offer.
            _client_session.LATEST_HANDSHAKE_VERSION = v
            await s.initialize()
        elif v == "auto":
            await negotiate_auto(s)
        else:
            await s.discover()  # 2026-07-28: server/discover, then adopt
        return s

    async def __aexit__(self, *exc: Any) -> None:
        await self.stack.aclose()


async def all_tools(s: ClientSession) -> tuple[list[str], int]:
    names: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None
        r = await s.list_tools(params=params)
        pages += 1
        names += [t.name for t in r.tools]
        cursor = r.next_cursor
        if not cursor or pages > 100000:
            return names, pages


def text_of(content: list[Any]) -> str:
    return "".join(getattr(c, "text", "") or "" for c in content)


async def case_list_tools(url: str, version: str | None = None) -> dict[str, Any]:
    c = Conn(url, version)
    async with c as s:
        names, pages = await all_tools(s)
        return {"version": s.protocol_version, "names": names, "pages": pages, "session_id": c.session_id}


async def case_call(url: str, name: str, args: str, version: str | None = None) -> dict[str, Any]:
    c = Conn(url, version)
    async with c as s:
        try:
            r = await s.call_tool(name, json.loads(args))
        except MCPError as e:
            return {"version": s.protocol_version, **err_obj(e)}
        return {
            "version": s.protocol_version,
            "isError": bool(r.is_error),
            "text": text_of(r.content),
            "content": [x.model_dump(by_alias=True, mode="json", exclude_none=True) for x in r.content],
            "structuredContent": r.structured_content,
        }


async def case_resources(url: str, version: str | None = None) -> dict[str, Any]:
    c = Conn(url, version)
    async with c as s:
        res: list[Any] = []
        cursor = None
        while True:
            r = await s.list_resources(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            res += r.resources
            cursor = r.next_cursor
            if not cursor:
                break
        read: dict[str, Any] = {}
        read_uris: dict[str, Any] = {}
        for x in res:
            try:
                rr = await s.read_resource(str(x.uri))
                read[str(x.uri)] = "".join(getattr(cc, "text", "") or "" for cc in rr.contents)
                read_uris[str(x.uri)] = [str(cc.uri) for cc in rr.contents]
            except MCPError as e:
                read[str(x.uri)] = err_obj(e)
        return {"version": s.protocol_version, "uris": [str(x.uri) for x in res],
                "names": [x.name for x in res], "read": read, "read_uris": read_uris}


async def case_prompts(url: str, version: str | None = None) -> dict[str, Any]:
    c = Conn(url, version)
    async with c as s:
        ps: list[Any] = []
        cursor = None
        while True:
            r = await s.list_prompts(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            ps += r.prompts
            cursor = r.next_cursor
            if not cursor:
                break
        got: dict[str, Any] = {}
        for p in ps:
            try:
                g = await s.get_prompt(p.name, {})
                got[p.name] = "".join(getattr(m.content, "text", "") or "" for m in g.messages)
            except MCPError as e:
                got[p.name] = err_obj(e)
        return {"version": s.protocol_version, "names": [p.name for p in ps], "get": got}


async def case_session(url: str, version: str | None = None, hold: str = "0") -> dict[str, Any]:
    c = Conn(url, version, keep=True)
    async with c as s:
        out({"version": s.protocol_version, "session_id": c.session_id})
        await anyio.sleep(float(hold))
    return {}


def _headers_of(resp: httpx2.Response) -> dict[str, str]:
    return {k: resp.headers[k] for k in INTERESTING if k in resp.headers}


def _parse_sse(text: str) -> list[Any]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.split("\n") if line.startswith("data:"))
        if data:
            try:
                events.append(json.loads(data))
            except ValueError:
                events.append(data)
    return events


async def do_raw(url: str, method: str, body: bytes | None, headers: dict[str, Any],
                 read_secs: float = 3.0) -> dict[str, Any]:
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **auth_headers()}
    for k, v in headers.items():
        for existing in [e for e in h if e.lower() == k.lower()]:
            del h[existing]
        if v is not None:
            h[k] = str(v)
    if method in ("GET", "DELETE", "HEAD"):
        h.pop("Content-Type", None)
    chunks: list[bytes] = []
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http:
        async with http.stream(method, url, content=body, headers=h) as resp:
            ctype = resp.headers.get("content-type", "")
            try:
                with anyio.fail_after(read_secs if ctype.startswith("text/event-stream") else 30.0):
                    async for chunk in resp.aiter_bytes():
                        chunks.append(chunk)
            except TimeoutError:
                pass
            text = b"".join(chunks).decode("utf-8", "replace")
            res: dict[str, Any] = {"status": resp.status_code, "headers": _headers_of(resp)}
            if ctype.startswith("text/event-stream"):
                res["sse"] = _parse_sse(text)
                res["body"] = res["sse"][-1] if res["sse"] else None
            else:
                try:
                    res["body"] = json.loads(text) if text else None
                except ValueError:
                    res["body"] = text
            b = res["body"]
            if isinstance(b, dict):
                if isinstance(b.get("error"), dict):
                    res["error"] = {"code": b["error"].get("code"), "message": b["error"].get("message")}
                tools = (b.get("result") or {}).get("tools") if isinstance(b.get("result"), dict) else None
                if isinstance(tools, list):
                    res["names"] = [t.get("name") for t in tools if isinstance(t, dict)]
            return res


async def case_replay(url: str, sid: str, version: str | None = None) -> dict[str, Any]:
    v = version if version and version != "auto" else "2025-11-25"
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    return await do_raw(url, "POST", body, {"Mcp-Session-Id": sid, "MCP-Protocol-Version": v})


async def case_raw(url: str, body_arg: str, headers_json: str = "{}") -> dict[str, Any]:
    headers = json.loads(headers_json)
    method = str(headers.pop(":method", "POST")).upper()
    read_secs = float(headers.pop(":timeout", 3))
    if body_arg.startswith("@pad:"):
        n = int(body_arg[5:])
        base = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {"pad": ""}}}
        base["params"]["_meta"]["pad"] = "x" * max(0, n - len(json.dumps(base)))
        body: bytes | None = json.dumps(base).encode()
    elif body_arg == "" and method in ("GET", "DELETE", "HEAD"):
        body = None
    else:
        body = body_arg.encode()
    return await do_raw(url, method, body, headers, read_secs)


async def case_watch(url: str, secs: str, version: str | None = None, trigger: str | None = None) -> dict[str, Any]:
    arrived = anyio.Event()
    via: list[str] = []

    async def handler(msg: Any) -> None:
        if getattr(msg, "method", None) == "notifications/tools/list_changed":
            via.append("message_handler")
            arrived.set()
        await anyio.lowlevel.checkpoint()

    c = Conn(url, version, handler=handler)
    async with c as s:
        before, _ = await all_tools(s)
        t0 = time.monotonic()
        modern = s.protocol_version not in HANDSHAKE
        async with AsyncExitStack() as st:
            if modern:
                sub = await st.enter_async_context(listen(s, tools_list_changed=True))

                async def pump() -> None:
                    async for ev in sub:
                        if type(ev).__name__ == "ToolsListChanged":
                            via.append("listen")
                            arrived.set()
                            return

                tg = await st.enter_async_context(anyio.create_task_group())
                tg.start_soon(pump)
            else:
                # 2025-*: server notifications ride the standalone GET stream; wait for its 200.
                with anyio.move_on_after(5):
                    await c.get_open.wait()
            sys.stderr.write(f"READY {c.session_id}\n")
            sys.stderr.flush()
            t0 = time.monotonic()
            if trigger:
                await s.call_tool(trigger, {})
            with anyio.move_on_after(float(secs)):
                await arrived.wait()
            waited = int((time.monotonic() - t0) * 1000)
            if modern:
                tg.cancel_scope.cancel()
        after, _ = await all_tools(s)
        return {"version": s.protocol_version, "session_id": c.session_id, "before": before,
                "arrived": arrived.is_set(), "after": after, "waited_ms": waited,
                "via": sorted(set(via)), "get_stream": c.get_open.is_set()}


CASES = {
    "list_tools": case_list_tools, "call": case_call, "resources": case_resources, "prompts": case_prompts,
    "session": case_session, "replay": case_replay, "watch": case_watch, "raw": case_raw,
}


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in CASES:
        sys.stderr.write(__doc__ or "")
        sys.exit(2)
    case, url, args = sys.argv[1], sys.argv[2], sys.argv[3:]

    async def run() -> dict[str, Any]:
        try:
            return await CASES[case](url, *args)
        except TypeError as e:
            if "positional argument" in str(e):
                sys.stderr.write(__doc__ or "")
                sys.exit(2)
            return err_obj(e)
        except BaseException as e:  # noqa: BLE001 - report, never crash
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return err_obj(e)

    res = anyio.run(run)
    if res:
        out(res)


if __name__ == "__main__":
    main()
