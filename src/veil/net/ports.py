"""Free loopback ports for local deployments and tests."""

from __future__ import annotations

import socket

from veil.errors import DeploymentError

__all__ = ["free_ports", "free_port", "check_can_listen"]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free on ``host`` a moment ago (all held open while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def check_can_listen(host: str, port: int) -> None:
    """Raise :class:`~veil.errors.DeploymentError` naming ``host:port`` if a server could not bind it now
    (port in use, address not on this machine, port out of range), before a server starts loading."""
    if not 0 <= port <= 65535:
        raise DeploymentError(f"port {port} is out of range; expected 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise DeploymentError(f"cannot listen on {host}:{port}: unknown address ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            raise DeploymentError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
