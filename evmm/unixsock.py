"""Listening Unix sockets, for every evmm socket a user names: the control channel and QMP (evmm/rpc/server.py),
evmm-oci's monitor, the vsock muxer and the console socket.

One rule for a path: a socket file left behind by an earlier run (nobody accepts on it) is replaced, a live
one is refused, anything else there is refused; each in one line naming the option.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from evmm.errors import ConfigError

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL
PORT_SUFFIX_MAX = len("_4294967295")  # hybrid vsock appends _<port> for guest-initiated connections


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A name for the socket ``path`` short enough to bind or connect to.

    Container engines' state directories are deep (docker: /run/docker/runtime-NAME/moby/<64 hex digits>/),
    past what sun_path holds; through an fd of its directory, /proc/self/fd/N/NAME reaches the same file.
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def check_socket_path(path: Path, option: str, *, port_suffix: bool = False, deep: bool = False) -> None:
    """Raise a one-line ``ConfigError`` unless a Unix socket can be created at ``path``.

    A socket file left behind by an earlier run (nobody accepts on it) is removed; a live one is refused.
    ``deep``: a path longer than sun_path is reached through its directory (``reachable``); without it (a
    socket whose peers are other programs, given the path as is) it is refused.
    """
    limit = SUN_PATH_MAX - (PORT_SUFFIX_MAX if port_suffix else 0)
    if not deep and len(os.fsencode(path)) > limit:
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
        with reachable(path) as name:
            probe.connect(name)
    except OSError:
        path.unlink()  # stale: nobody listens there any more
        return
    finally:
        probe.close()
    raise ConfigError(f"{option}: {path} is in use by another program (something accepts connections on it)")


def listen_unix(
    path: Path, option: str, *, port_suffix: bool = False, private: bool = False, deep: bool = False
) -> socket.socket:
    """A non-blocking listening socket at ``path``; ``private``: mode 0600 (a socket that can stop the VM
    is its owner's only)."""
    check_socket_path(path, option, port_suffix=port_suffix, deep=deep)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        with reachable(path) as name:
            sock.bind(name)
        if private:
            os.chmod(path, 0o600)
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


__all__ = ["SUN_PATH_MAX", "check_socket_path", "listen_unix", "peer_closed", "reachable"]
