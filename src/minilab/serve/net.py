"""Sockets for the server: is a host loopback only, binding (port 0 picks a free one), the base URL.

Used by the `serve` verb and by `app.running_server`, below both.
"""

from __future__ import annotations

import ipaddress
import socket

from minilab.errors import MinilabError


def is_loopback(host: str) -> bool:
    """True when `host` only ever resolves to loopback addresses (localhost, 127.x, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), as uvicorn binds one; `port=0` picks a free port, which
    `getsockname()` then tells (binding here is how the real port is known before serving)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise MinilabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def base_url(host: str, sock: socket.socket) -> str:
    """http://HOST:PORT for `host` as given and the port `sock` actually bound (IPv6 in brackets)."""
    host = host.strip("[]")
    return f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}"
