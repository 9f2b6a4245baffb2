"""The MCP tests' upstream server: the SDK's own MCPServer over streamable HTTP and TLS.

Usage: server.py ADDRESS PORT CERT KEY LOG PATH...

Tools `echo(text)` and `delete_repo(name)`. Every tool call the server executes is
appended to LOG as one line (the tool's name), so a test can show that a call the proxy
refused never arrived. The same server answers on every PATH, so one process stands for
an approved server (its registry path) and a shadow one (a path the registry lacks).
"""

import sys

import uvicorn
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import Route

address, port, cert, key, log = sys.argv[1:6]
paths = sys.argv[6:]

app = MCPServer("enforcer-test")


def executed(tool: str) -> None:
    # Flushed and closed per call: the test reads the file while the server runs.
    with open(log, "a", encoding="utf-8") as f:
        f.write(tool + "\n")


@app.tool()
def echo(text: str) -> str:
    """Returns `text`."""
    executed("echo")
    return text


@app.tool()
def delete_repo(name: str) -> str:
    """The call a policy keeps from the agent."""
    executed("delete_repo")
    return "deleted " + name


# The SDK refuses a Host it does not know (DNS-rebinding protection). The Host here is
# the name the agent used (api.example.test:PORT), forwarded by the proxy; the test
# lab's server is no browser-reachable service, so the check is off rather than taught
# the lab's names.
security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
starlette = app.streamable_http_app(streamable_http_path=paths[0], transport_security=security)
# The other paths reach the same endpoint (and the same sessions) as the first.
endpoint = next(r.endpoint for r in starlette.router.routes if getattr(r, "path", None) == paths[0])
for other in paths[1:]:
    starlette.router.routes.append(Route(other, endpoint=endpoint))
uvicorn.run(
    starlette,
    host=address,
    port=int(port),
    ssl_certfile=cert,
    ssl_keyfile=key,
    log_level="warning",
)
