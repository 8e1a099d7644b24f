"""A container's terminal on the host: a pty whose master goes to the caller over ``--console-socket``.

runc's protocol (runc docs/terminals.md): connect to the caller's Unix socket and send one message carrying
the pty master as SCM_RIGHTS, with the pty's name as data.  The caller (containerd's shim, conmon) then
reads and writes the master and sets its window size there.  evmm-oci keeps the slave, in raw mode (the
guest's own pty does echo, line editing and ^C -> SIGINT), as its controlling terminal: a window size set on
the master reaches it as SIGWINCH, and it passes the new size on to the guest.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
import tty

from evmm.errors import EvmmError


def open_pty() -> tuple[int, int, str]:
    """(master, slave, slave's name); the slave raw."""
    master, slave = os.openpty()
    os.set_inheritable(master, False)
    os.set_inheritable(slave, False)
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def send_master(console_socket: str, master: int, name: str) -> None:
    """The pty master to the caller's ``--console-socket``, as runc sends it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(console_socket)
            fds = array.array("i", [master])
            sock.sendmsg([name.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    except OSError as e:
        raise EvmmError(f"--console-socket {console_socket}: {e.strerror or e}") from None


def receive_master(sock: socket.socket) -> int:
    """The caller's side of ``send_master`` (for tests and ``evmm-oci run -t``): the fd received."""
    fds = array.array("i")
    _msg, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not fds:
        raise EvmmError("the console socket's message carried no file descriptor")
    return fds[0]


def take_controlling_terminal(slave: int) -> None:
    """Make ``slave`` this session leader's controlling terminal (the caller ran setsid first)."""
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of a terminal; (0, 0) when it has none set."""
    rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
