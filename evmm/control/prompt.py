"""The Ctrl-] escape menu of an interactive console (``evmm run`` on a terminal, ``evmm console``).

Ctrl-] shows a one-line rich status (VM state, vCPUs, uptime) with the menu keys; the next key chooses:

    p pause    r resume    d detach (evmm console only)    q quit the VM    s status again
    ] or Ctrl-] send a literal Ctrl-] to the guest          anything else: back to the console

``EscapeMenu`` only turns keys into actions on a ``MenuTarget`` and lines of text for the terminal; it owns no
fd and no terminal mode (the caller's ``RawTerminal`` restores the terminal on every way out).  Two ways in:

- ``feed(data) -> bytes`` for a caller that reads the terminal itself (``evmm console``): it takes raw input
  and returns what should reach the guest;
- ``on_escape(key)`` for ``ConsoleIO(on_escape=...)`` in ``evmm run``, which already swallows Ctrl-] and hands
  over the key typed after it (and turns Ctrl-] Ctrl-] into one literal Ctrl-] itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from evmm.errors import EvmmError
from evmm.record import record

if TYPE_CHECKING:
    from evmm.control.client import Client
    from evmm.control.commands import Commands

ESCAPE = 0x1D  # Ctrl-]
ESC = 0x1B


@record(frozen=True)
class Status:
    state: str
    vcpus: int
    uptime: float


class MenuTarget(Protocol):
    async def status(self) -> Status: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def quit(self) -> None: ...


def _status_of(vm: dict[str, Any]) -> Status:
    return Status(str(vm.get("state", "?")), len(vm.get("vcpus", [])), float(vm.get("uptime", 0.0)))


class CommandsTarget:
    """The menu of ``evmm run``: straight to the command core, on the reactor."""

    def __init__(self, commands: Commands, client: str = "the console menu") -> None:
        self.commands = commands
        self.client = client

    async def status(self) -> Status:
        return _status_of(await self.commands.call("query-vm", client=self.client))

    async def pause(self) -> None:
        await self.commands.call("pause", client=self.client)

    async def resume(self) -> None:
        await self.commands.call("resume", client=self.client)

    async def quit(self) -> None:
        await self.commands.call("quit", client=self.client)


class ClientTarget:
    """The menu of ``evmm console``: through the control socket."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def status(self) -> Status:
        return _status_of(await self.client.call("query-vm"))

    async def pause(self) -> None:
        await self.client.call("pause")

    async def resume(self) -> None:
        await self.client.call("resume")

    async def quit(self) -> None:
        await self.client.call("quit")


def uptime_text(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


STATE_STYLE = {"running": "bold green", "paused": "bold yellow", "stopped": "bold red"}


def render(status: Status | None, message: str, *, detach: bool, width: int = 100) -> bytes:
    """One status line as terminal bytes, starting and ending on a fresh line (the terminal is raw)."""
    # Imported here, when a person opens the menu: rich costs ~25 ms of evmm run's start-up otherwise.
    from rich.console import Console
    from rich.text import Text

    line = Text()
    line.append(" evmm ", style="bold reverse")
    if status is not None:
        line.append(" ")
        line.append(status.state, style=STATE_STYLE.get(status.state, "bold"))
        vcpus = "vCPU" if status.vcpus == 1 else "vCPUs"
        line.append(f" · {status.vcpus} {vcpus} · up {uptime_text(status.uptime)}")
    if message:
        line.append(" │ ")
        line.append(message, style="bold" if message.startswith("p ") else "")
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="standard", width=width, highlight=False)
    console.print(line, end="", soft_wrap=True)
    return b"\r\n" + buf.getvalue().encode() + b"\r\n"


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """A ``write`` for the menu that never blocks the reactor for long and never raises."""

    def write(data: bytes) -> None:
        with contextlib.suppress(OSError):
            while data:
                try:
                    n = os.write(fd, data)
                except BlockingIOError:
                    return  # a stalled terminal: the status line is not worth waiting for
                data = data[n:]

    return write


class EscapeMenu:
    def __init__(
        self,
        target: MenuTarget,
        write: Callable[[bytes], None],
        *,
        detach: Callable[[], None] | None = None,
        send: Callable[[bytes], None] | None = None,
        width: Callable[[], int] | None = None,
    ) -> None:
        """``write`` shows text on the terminal; ``detach`` (evmm console only) leaves; ``send`` types into
        the guest, for the literal Ctrl-] of ``on_escape``; ``width`` gives the terminal's columns."""
        self.target = target
        self.write = write
        self.detach = detach
        self.send = send
        self.width = width or (lambda: 100)
        self.is_open = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def keys(self) -> str:
        detach = "  d detach" if self.detach is not None else ""
        return f"p pause  r resume{detach}  q quit VM  ] send ^]  other: back"

    # ---- ways in --------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Raw terminal input in; what the guest should get out.  Menu keys are acted on."""
        out = bytearray()
        for b in data:
            if self.is_open:
                self.is_open = False
                if b in (ESCAPE, ord("]")):
                    out.append(ESCAPE)
                else:
                    self._act(b)
            elif b == ESCAPE:
                self.open()
            else:
                out.append(b)
        return bytes(out)

    def on_escape(self, key: bytes) -> None:
        """``ConsoleIO``'s hook: Ctrl-] then ``key`` (Ctrl-] Ctrl-] never arrives here)."""
        if key == b"]" and self.send is not None:
            self.send(bytes([ESCAPE]))
        elif key in (b"?", b"h", b"\r", b" ", b"m"):
            self.open()
        elif key:
            self._act(key[0])

    def open(self) -> None:
        self.is_open = True
        self._spawn(self._show(self.keys))

    # ---- actions --------------------------------------------------------------------------------------------

    def _act(self, key: int) -> None:
        k = chr(key).lower() if key < 0x80 else ""
        if k == "p":
            self._spawn(self._do("pausing", self.target.pause, "paused"))
        elif k in ("r", "c"):
            self._spawn(self._do("resuming", self.target.resume, "running"))
        elif k == "q" or key in (0x11, 0x18):  # q, Ctrl-Q, Ctrl-X as in evmm run's first escape keys
            self._spawn(self._do("quitting", self.target.quit, "quit"))
        elif k == "d" and self.detach is not None:
            self.detach()
        elif k == "s":
            self._spawn(self._show(""))
        else:
            self.write(render(None, "back to the console", detach=False, width=self.width()))

    async def _show(self, message: str) -> None:
        try:
            status: Status | None = await self.target.status()
        except EvmmError as e:
            status, message = None, str(e)
        self.write(render(status, message, detach=self.detach is not None, width=self.width()))

    async def _do(self, doing: str, action: Callable[[], Coroutine[Any, Any, None]], done: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await action()
        except EvmmError as e:
            self.write(render(None, f"{doing} failed: {e}", detach=False, width=self.width()))
            return
        if done == "quit":
            self.write(render(None, "quit: the VM is stopping", detach=False, width=self.width()))
            return
        await self._show(f"{done} in {(loop.time() - started) * 1000:.1f} ms")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
