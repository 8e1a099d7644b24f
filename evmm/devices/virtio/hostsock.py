"""Unix-socket plumbing shared by the host sides of virtio devices (the vsock muxer, the console socket)."""

from __future__ import annotations

import os
import select
import socket
import stat
from pathlib import Path

from evmm.errors import ConfigError

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL
PORT_SUFFIX_MAX = len("_4294967295")  # hybrid vsock appends _<port> for guest-initiated connections


def check_socket_path(path: Path, option: str, *, port_suffix: bool = False) -> None:
    """Raise a one-line ``ConfigError`` unless a Unix socket can be created at ``path``.

    A socket file left behind by an earlier run (nobody accepts on it) is removed; a live one is refused.
    """
    limit = SUN_PATH_MAX - (PORT_SUFFIX_MAX if port_suffix else 0)
    if len(os.fsencode(path)) > limit:
        raise ConfigError(f"{option}: socket path {path} is longer than {limit} bytes (a Unix socket limit)")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{option}: socket path {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: socket path {path}: directory {parent} is not writable")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{option}: {path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens there any more
        return
    finally:
        probe.close()
    raise ConfigError(f"{option}: {path} is in use by another program (something accepts connections on it)")


def listen_unix(path: Path, option: str, *, port_suffix: bool = False) -> socket.socket:
    check_socket_path(path, option, port_suffix=port_suffix)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{option}: cannot listen on {path}: {e.strerror}") from None
    return sock


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer closed both ways, after read returned EOF (a half-close leaves POLLHUP clear).

    Linux's unix_poll reports POLLHUP only once both directions are shut down, which tells a client's
    ``shutdown(SHUT_WR)`` (more may be read from us) from its ``close()``.
    """
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


__all__ = ["SUN_PATH_MAX", "check_socket_path", "listen_unix", "peer_closed"]
