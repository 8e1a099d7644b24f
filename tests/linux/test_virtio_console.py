"""virtio-console as hvc0 (issue 4): a shell on hvc0 over the Unix-socket endpoint while the serial console
stays on ttyS0, a pty endpoint, and ``console=hvc0`` with the terminal (here: pipes) given to hvc0.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, evmm_run_argv, kernel_args

BOOT_TIMEOUT = 120.0


def read_until(fd_read: Callable[[], bytes], want: bytes, timeout: float = 30.0) -> bytes:
    """Read from a socket or fd (a ``recv``/``os.read`` closure) until ``want`` shows up."""
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {want!r} from hvc0 within {timeout:g} s; got {got[-200:]!r}")
        try:
            chunk = fd_read()
        except (BlockingIOError, TimeoutError):
            time.sleep(0.05)
            continue
        if not chunk:
            raise EOFError(f"hvc0 endpoint closed before {want!r}; got {got[-200:]!r}")
        got += chunk
    return got


@pytest.mark.both_boards
def test_shell_on_hvc0_over_a_socket(launch: GuestFactory, guest_assets: GuestAssets, board: str) -> None:
    path = Path(tempfile.mkdtemp(prefix="evmm-hvc-", dir="/tmp")) / "hvc.sock"
    argv = [
        *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, board=board),
        *("--virtio-console", str(path)),
    ]
    guest = launch(argv, f"evmm-hvc-socket-{board}")
    guest.expect(READY, BOOT_TIMEOUT)  # on ttyS0: the serial console is still the console
    guest.expect(PROMPT, 30)
    assert guest.check("ls /dev/hvc0").strip() == "/dev/hvc0"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(1)
    # Plain output to hvc0 reaches the client.
    guest.check("echo hello-from-hvc0 > /dev/hvc0")
    read_until(lambda: s.recv(4096), b"hello-from-hvc0")
    # A shell on hvc0: what the client types runs in the guest and the answer comes back.
    guest.check("setsid sh -c 'exec sh -i </dev/hvc0 >/dev/hvc0 2>&1' & true")
    read_until(lambda: s.recv(4096), b"# ")  # its prompt: the shell is reading hvc0 now
    s.sendall(b"echo hvc-$((6 * 7))\r")  # Enter, as a terminal sends it
    read_until(lambda: s.recv(4096), b"hvc-42")
    s.sendall(b"exit\r")
    s.close()
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


@pytest.mark.no_jail("a pty endpoint: evmm jail refuses it (the jail has no /dev/pts the host could reach)")
def test_hvc0_on_a_pty(launch: GuestFactory, guest_assets: GuestAssets, board: str) -> None:
    argv = [
        *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, board=board),
        "--virtio-console",
        "pty",
    ]
    guest = launch(argv, f"evmm-hvc-pty-{board}")
    m = guest.expect(re.compile(r"virtio-console \(hvc0\) is on (/dev/pts/\d+)"), BOOT_TIMEOUT)
    fd = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        guest.expect(READY, BOOT_TIMEOUT)
        guest.expect(PROMPT, 30)
        guest.check("echo via-pty > /dev/hvc0")
        read_until(lambda: os.read(fd, 4096), b"via-pty")
        guest.check("setsid sh -c 'exec sh -i </dev/hvc0 >/dev/hvc0 2>&1' & true")
        read_until(lambda: os.read(fd, 4096), b"# ")
        os.write(fd, b"echo pty-$((6 * 7))\r")
        read_until(lambda: os.read(fd, 4096), b"pty-42")
    finally:
        os.close(fd)
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def test_console_on_hvc0(launch: GuestFactory, guest_assets: GuestAssets, board: str) -> None:
    """``console=hvc0``: the guest's console shell runs on the virtio console, which has evmm's stdio."""
    append = kernel_args().replace("console=ttyS0", "console=hvc0")
    argv = [
        *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, append=append, board=board),
        *("--virtio-console", "stdio"),
    ]
    guest = launch(argv, f"evmm-hvc-console-{board}")
    # Not READY: virtio_console is a module here, so when the kernel starts /init there is no console yet
    # for its stdout ("unable to open an initial console"); busybox init's shell opens hvc0 by itself.
    guest.expect(PROMPT, BOOT_TIMEOUT)
    assert "hvc0" in guest.check("cat /proc/consoles")
    output, status = guest.run("echo $((6 * 7)); false")
    assert (output.strip(), status) == ("42", 1)
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
