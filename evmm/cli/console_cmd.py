"""``evmm console SOCK``: this terminal, in raw mode, on a running VM's console through its control socket.

Ctrl-] opens the escape menu (evmm/control/prompt.py); ``d`` detaches and leaves the VM running, and
``evmm console SOCK`` attaches again (the console's recent output is replayed, so the screen has context).
Several consoles may be attached at once: all see the output, and input from any reaches the guest.  Window
size changes are passed on (``console-resize``).  The terminal is restored on every way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from evmm.control.client import Client
from evmm.control.prompt import ClientTarget, EscapeMenu, fd_writer
from evmm.errors import EvmmError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "console",
        help="attach this terminal to a running VM's console",
        description="Attach the terminal to the guest console of a VM started with --api-sock SOCK. Ctrl-] "
        "opens a menu: p pause, r resume, d detach (the VM keeps running), q quit the VM, ] a literal Ctrl-].",
    )
    p.add_argument("sock", type=Path, metavar="SOCK", help="the VM's control socket (evmm run --api-sock)")
    p.add_argument("--no-replay", action="store_true", help="do not show the console's recent output first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    return asyncio.run(attach(args.sock, in_fd, out_fd, replay=not args.no_replay))


def _size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


class ConsoleSession:
    """One attachment: terminal input -> menu filter -> console-input; console-output -> the terminal."""

    def __init__(self, client: Client, in_fd: int, out_fd: int) -> None:
        self.client = client
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.write = fd_writer(out_fd)
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.menu = EscapeMenu(
            ClientTarget(client),
            self.write,
            detach=lambda: self._end("detached"),
            width=lambda: (_size(out_fd) or (24, 100))[1],
        )

    def _end(self, why: str) -> None:
        if not self.ended.done():
            self.ended.set_result(why)

    def _on_input(self) -> None:
        try:
            data = os.read(self.in_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of input (a pipe): leave the VM as it is
            self._end("detached")
            return
        to_guest = self.menu.feed(data)
        if to_guest and self.client.connected:
            self.client.console_input(to_guest)

    def _on_resize(self) -> None:
        size = _size(self.out_fd)
        if size is not None and self.client.connected:
            self.client.send_nowait("console-resize", {"rows": size[0], "cols": size[1]})

    async def _pump_output(self) -> None:
        async for chunk in self.client.console_output():
            self.write(chunk)
        self._end("closed")

    async def stop_reason(self) -> str | None:
        """After the connection closed: why the VM stopped, from its shutdown event, if one came."""
        reason = None
        while (ev := await self.client.next_event(1.0)) is not None:
            if ev.event == "shutdown":
                reason = str(ev.data.get("reason", "the VM stopped"))
        return reason

    async def run(self, replay: bytes) -> str:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(self._pump_output())]
        self.write(replay)
        loop.add_reader(self.in_fd, self._on_input)
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread, or no SIGWINCH
            loop.add_signal_handler(signal.SIGWINCH, self._on_resize)
        self._on_resize()
        try:
            return await self.ended
        finally:
            loop.remove_reader(self.in_fd)
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signal.SIGWINCH)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def attach(path: Path, in_fd: int, out_fd: int, *, replay: bool = True) -> int:
    from evmm.loop.terminal import RawTerminal

    async with Client(path) as client:
        state = await client.subscribe()
        if state == "stopped":
            raise EvmmError(f"{path}: the VM has stopped")
        history = await client.console_attach(replay=replay)
        with RawTerminal(in_fd) as term:
            nl = "\r\n" if term.active else "\n"
            note = f"[evmm] attached to {path} (VM {state}); Ctrl-] for the menu{nl}"
            os.write(out_fd, note.encode())
            session = ConsoleSession(client, in_fd, out_fd)
            why = await session.run(history)
            if why == "detached":
                with contextlib.suppress(EvmmError):
                    await client.console_detach()
                os.write(
                    out_fd, f"{nl}[evmm] detached; the VM keeps running: evmm console {path}{nl}".encode()
                )
                return 0
            # The connection closed: the VM stopped (its shutdown event came first) or the VMM died.
            reason = await session.stop_reason()
            if reason is None:
                raise EvmmError(f"{path}: {client.closed_reason or 'the VMM closed the control connection'}")
            os.write(out_fd, f"{nl}[evmm] the VM stopped: {reason}{nl}".encode())
            return 0
