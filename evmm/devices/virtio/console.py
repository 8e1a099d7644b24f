"""virtio-console (virtio 1.2 §5.3) with one port, which Linux makes ``hvc0``.

No VIRTIO_CONSOLE_F_MULTIPORT: two queues, receiveq (0) and transmitq (1) for port 0 (§5.3.2).  The config
space carries the console size (F_SIZE, so a host window change can be pushed with a config interrupt,
§5.3.6) and the emergency-write register (F_EMERG_WRITE, §5.3.4).

Output is taken from transmitq at once and handed to the endpoint, which buffers it: Linux's hvc driver
busy-waits until each write is used, so holding it back would only burn a guest CPU.  Input is read from the
endpoint straight into receiveq buffers, and only while there are some: with none left the endpoint is not
read at all until the driver posts more and kicks (backpressure instead of loss).
"""

from __future__ import annotations

import struct

from evmm.config.devspec import ConsoleSpec
from evmm.devices.virtio.chain import DescriptorChain
from evmm.devices.virtio.console_backend import ConsoleBackend, FdBackend, PtyBackend, SocketBackend
from evmm.devices.virtio.device import (
    COMMON_FEATURES,
    CONFIG_CHANGE,
    VIRTIO_ID_CONSOLE,
    Activation,
    VirtioDevice,
)
from evmm.errors import ConfigError
from evmm.log import log

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 256
VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2
EMERG_WR_OFFSET = 8  # struct virtio_console_config { le16 cols, rows; le32 max_nr_ports, emerg_wr; }
DEFAULT_SIZE = (80, 24)


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(
        self, backend: ConsoleBackend, cols: int = DEFAULT_SIZE[0], rows: int = DEFAULT_SIZE[1]
    ) -> None:
        super().__init__((QUEUE_SIZE, QUEUE_SIZE))
        self.backend = backend
        self.cols = cols
        self.rows = rows
        self.bytes_out = 0
        self.bytes_in = 0

    def features(self) -> int:
        return COMMON_FEATURES | VIRTIO_CONSOLE_F_SIZE | VIRTIO_CONSOLE_F_EMERG_WRITE

    def config(self) -> bytes:
        return struct.pack("<HHII", self.cols & 0xFFFF, self.rows & 0xFFFF, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # §5.3.4: a byte written to emerg_wr goes out at once, before (or without) any queue.
        if offset == EMERG_WR_OFFSET and data:
            self.backend.write(data[:1])
            self.bytes_out += 1

    @property
    def endpoint(self) -> str:
        return self.backend.describe()

    def set_size(self, cols: int, rows: int) -> None:
        """The host's window changed: tell the driver through the config space (§5.3.6)."""
        if (cols, rows) == (self.cols, self.rows):
            return
        self.cols, self.rows = cols, rows
        if self.ctx is not None and self.ctx.features & VIRTIO_CONSOLE_F_SIZE:
            self.ctx.interrupt.trigger(CONFIG_CHANGE)

    def follow_endpoint_size(self) -> None:
        """The endpoint's terminal may have changed size (SIGWINCH): pass it on, so the guest's hvc0 (and
        every full-screen program on it) gets the new rows and columns (Linux: hvc_resize, TIOCSWINSZ)."""
        size = self.backend.size()
        if size is not None:
            self.set_size(*size)

    def activate(self, ctx: Activation) -> None:
        super().activate(ctx)
        self.backend.start(ctx.reactor, self._fill_rx)
        self.backend.want_input(True)

    def queue_notify(self, index: int) -> None:
        if self.ctx is None:
            return
        if index == TRANSMITQ:
            self._drain_tx()
        elif index == RECEIVEQ:
            self.backend.want_input(True)  # new buffers: read the endpoint again when it has input

    def _drain_tx(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        q = ctx.queue(TRANSMITQ)
        done = False
        while True:
            chain = q.pop(ctx.mem)
            if chain is None:
                q.set_notification(True)  # every later write must kick: the driver waits on each
                if q.has_available():
                    continue
                break
            if isinstance(chain, DescriptorChain):
                data = chain.read_all(ctx.mem)
                self.bytes_out += len(data)
                self.backend.write(data)
            q.add_used(chain.head, 0)
            done = True
        if done:
            ctx.signal_used(q)

    def _fill_rx(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        q = ctx.queue(RECEIVEQ)
        used = False
        while True:
            chain = q.pop(ctx.mem)
            if chain is None:
                self.backend.want_input(False)
                q.set_notification(True)
                if not q.has_available():
                    break
                self.backend.want_input(True)
                continue
            if not isinstance(chain, DescriptorChain) or chain.writable_len == 0:
                q.add_used(chain.head, 0)
                used = True
                continue
            n = self.backend.read_into(chain.writable_views(ctx.mem))
            if n == 0:
                q.undo_pop()
                break
            self.bytes_in += n
            q.add_used(chain.head, n)
            used = True
        if used:
            ctx.signal_used(q)

    def reset(self) -> None:
        self.backend.want_input(False)
        super().reset()

    def close(self) -> None:
        self.backend.close()


def make_console(spec: ConsoleSpec, stdio_fds: tuple[int, int] | None) -> VirtioConsole:
    """The virtio console for ``--virtio-console``; ``stdio_fds`` (in, out) when the terminal is for it."""
    backend: ConsoleBackend
    if spec.kind == "stdio":
        if stdio_fds is None:
            raise ConfigError("--virtio-console stdio: the terminal is taken by the serial console")
        backend = FdBackend(stdio_fds[0], stdio_fds[1])
    elif spec.kind == "pty":
        try:
            backend = PtyBackend()
        except OSError as e:
            raise ConfigError(
                f"--virtio-console pty: cannot create a pseudo-terminal: {e.strerror}"
            ) from None
        log.info("virtio-console (hvc0) is on %s", backend.pty_path)
    elif spec.kind == "socket" and spec.path is not None:
        backend = SocketBackend(spec.path)
    else:
        raise ConfigError(f"--virtio-console: unknown endpoint {spec.kind!r} (stdio, pty or a socket PATH)")
    cols, rows = backend.size() or DEFAULT_SIZE
    return VirtioConsole(backend, cols, rows)


__all__ = ["VirtioConsole", "make_console"]
