"""Who may talk to the server: the `Host` a request names and the `Origin` a browser sends, checked
before any route runs (a pure ASGI middleware, so streaming and every endpoint are covered).

Why: a server on 127.0.0.1 without an API key is reachable by every web page its user opens.
- **DNS rebinding**: a page at http://evil.example:8000 re-points its own name at 127.0.0.1 and
  then talks to us as if same-origin. Its requests say `Host: evil.example:8000` → 400, unless
  the name is trusted.
- **Cross-site requests** (CSRF): any page may send a "simple" POST (text/plain, a form) to
  http://127.0.0.1:8000 and have it run. Browsers add `Origin: http://evil.example` → 403,
  unless that origin is configured (`--cors-origin`). JSON endpoints also take only
  `Content-Type: application/json` (415), which no page can send cross-origin without a
  preflight that is refused here the same way.

Trusted Host names (the name only, not the port: an ssh tunnel or port forward changes the port,
and the name is what a rebinding page controls):
- always `localhost` and any IP address literal (a page cannot rebind a literal: the browser
  connects to that very address);
- the `--host` name served on; for a wildcard (0.0.0.0, ::) this machine's hostname and FQDN;
- the names given with `--allowed-hosts` (`*`: any name);
- with an API key and no `--allowed-hosts`: any name (the key protects the API; a rebinding
  page does not know it).

An `Origin` is accepted when absent (curl, SDKs), the server's own (`http(s)://` + the request's
Host, as the chat page at `/` sends), or configured with `--cors-origin` (`*`: any); only then are
CORS headers added and preflights answered (starlette's CORSMiddleware).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from minilab.serve import protocol as p

log = logging.getLogger("minilab.serve")
WILDCARDS = ("0.0.0.0", "::", "")


def host_name(value: str) -> str | None:
    """The name in a Host header value (`name`, `name:port`, `[v6]:port`), lowercased; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():  # also an unbracketed IPv6 address
        return None
    return name.rstrip(".") or None


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def trusted_hosts(bind_host: str, api_key: str | None, allowed: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names served besides IP literals (see the module doc); None: any name."""
    names = {n.lower() for n in allowed}
    if "*" in names or (api_key and not names):
        return None
    host = bind_host.strip("[]").lower()
    if host in WILDCARDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(host)
    return frozenset(names | {"localhost"})


def allowed_host_arg(text: str) -> list[str]:
    """argparse `type=` for `--allowed-hosts NAME[,NAME...]`: names (a port is dropped) or `*`."""
    names = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        name = "*" if part == "*" else host_name(part)
        if name is None or "/" in name or "@" in name:
            raise argparse.ArgumentTypeError(f"{part!r} is not a host name (e.g. example.com, 10.0.0.5 or *)")
        names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("give a host name (e.g. example.com) or *")
    return names


def origin_arg(text: str) -> str:
    """argparse `type=` for `--cors-origin`: `scheme://host[:port]` as browsers send it, or `*`."""
    if text == "*":
        return text
    url = urlsplit(text.strip().rstrip("/"))
    if url.scheme not in ("http", "https") or not url.netloc or url.path or url.query or url.fragment:
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin: give scheme://host[:port], e.g. "
                                         "http://localhost:3000 (no path), or *")
    return f"{url.scheme}://{url.netloc.lower()}"


class Guard:
    """ASGI middleware: 400 for an untrusted Host, 403 for a foreign Origin, before the app runs."""

    def __init__(self, app: Any, *, hosts: frozenset[str] | None, origins: frozenset[str]):
        self.app, self.hosts, self.origins = app, hosts, origins
        self.logged: set[str] = set()  # each refused name once in the log, not once per request

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"host", b"origin")}
        host = headers.get("host", "")
        name = host_name(host)
        if self.hosts is not None and not (name and (name in self.hosts or is_ip(name))):
            return await self._refuse(scope, receive, send, p.ApiError(
                400, f"Host {host!r} is not served here; if this name is yours, start the server with "
                     f"--allowed-hosts {name or 'NAME'} (a guard against DNS rebinding)", code="host_not_allowed"))
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, host):
            return await self._refuse(scope, receive, send, p.ApiError(
                403, f"cross-origin request from {origin!r} refused; to let that web page use this server, "
                     f"start it with --cors-origin {origin}", code="origin_not_allowed"))
        return await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        if "*" in self.origins or origin.lower() in self.origins:
            return True
        url = urlsplit(origin.lower())
        return url.scheme in ("http", "https") and bool(url.netloc) and url.netloc == host.strip().lower()

    async def _refuse(self, scope: dict, receive: Any, send: Any, error: p.ApiError) -> None:
        if error.message not in self.logged and len(self.logged) < 100:
            self.logged.add(error.message)
            log.warning("refused %s %s: %s", scope.get("method", ""), scope.get("path", ""), error.message)
        if scope["type"] == "websocket":  # none are served; close before accepting
            return await send({"type": "websocket.close", "code": 1008})
        await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


def protect(app: Any, *, bind_host: str, api_key: str | None, allowed_hosts: Iterable[str] = (),
            cors_origins: Iterable[str] = ()) -> None:
    """Add the Guard (outermost) and, when origins are configured, CORS headers to a FastAPI app."""
    from starlette.middleware.cors import CORSMiddleware

    origins = frozenset(cors_origins)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.state.trusted_hosts = trusted_hosts(bind_host, api_key, allowed_hosts)  # what `serve` logs
    app.add_middleware(Guard, hosts=app.state.trusted_hosts, origins=origins)
