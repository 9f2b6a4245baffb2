"""The MCP tests' agent: the SDK's own client over streamable HTTP, trusting CA.

Usage: client.py URL CA TOOL:ARG...

Runs `initialize`, then calls each TOOL with its one string argument (`echo:hi` is
echo(text="hi"), `delete_repo:x` is delete_repo(name="x")) and prints one JSON line per
call: {"tool", "ok": true, "text"} or {"tool", "ok": false, "code", "message"}.
Exit 0 when the session was set up; 2 (with {"setup": false, "code", "message"} on
stdout) when it was not, e.g. when the initialize itself was refused.
"""

import json
import sys

import anyio
import httpx2
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client

ARGUMENT = {"echo": "text", "delete_repo": "name"}


def error_fields(e: BaseException) -> dict:
    """The JSON-RPC code and message of `e`, looking inside exception groups (anyio task
    groups wrap what a transport task raised)."""
    if isinstance(e, MCPError):
        return {"code": e.error.code, "message": e.error.message}
    for inner in getattr(e, "exceptions", ()):
        found = error_fields(inner)
        if "code" in found:
            return found
    cause = e.__cause__ or e.__context__
    if cause is not None and cause is not e:
        found = error_fields(cause)
        if "code" in found:
            return found
    return {"code": None, "message": f"{type(e).__name__}: {e}"}


async def main(url: str, ca: str, calls: list[str]) -> int:
    try:
        async with httpx2.AsyncClient(verify=ca, timeout=30) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    try:
                        await session.initialize()
                    except BaseException as e:  # noqa: BLE001 - reported, not hidden
                        print(json.dumps({"setup": False, **error_fields(e)}), flush=True)
                        return 2
                    for call in calls:
                        tool, _, arg = call.partition(":")
                        try:
                            result = await session.call_tool(tool, {ARGUMENT.get(tool, "text"): arg})
                        except MCPError as e:
                            line = {"tool": tool, "ok": False, **error_fields(e)}
                        else:
                            text = "".join(getattr(c, "text", "") for c in result.content)
                            line = {"tool": tool, "ok": not result.is_error, "text": text}
                        print(json.dumps(line), flush=True)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        print(json.dumps({"setup": False, **error_fields(e)}), flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:]))
