"""``evmm exec SOCK [-i] [-t] [--env K=V]... [--cwd DIR] [--user UID[:GID]] -- CMD...``, as ``docker exec``.

Runs CMD in the guest of the VM whose control socket is SOCK, through its agent (evmm-agent over vsock), and
exits with CMD's status (128 + N when signal N ended it).  ``-i`` passes this process's stdin on; ``-t``
gives CMD a terminal of this window's size that follows its resizes.  With ``-it`` this terminal is raw, so
Ctrl-C is the guest terminal's (it interrupts CMD there); otherwise SIGINT, SIGTERM, SIGHUP and SIGQUIT
received here are sent on to CMD's process group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from evmm.errors import EvmmError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "-i", "--interactive", action="store_true", default=d(False), help="pass this stdin on to CMD"
    )
    p.add_argument(
        "-t", "--tty", action="store_true", default=d(False), help="give CMD a terminal (this window's size)"
    )
    p.add_argument(
        "-e", "--env", action="append", default=d([]), metavar="K=V", help="set a variable (repeatable)"
    )
    p.add_argument("-w", "--cwd", metavar="DIR", default=d(None), help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="UID[:GID]", default=d(None), help="run as this user (numeric)")
    p.add_argument("--port", type=int, default=d(1024), help="the agent's vsock port (default 1024)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "exec",
        help="run a command in a running VM's guest (its evmm-agent), as docker exec",
        description="Run CMD in the guest of the VM started with --api-sock SOCK and --vsock (its evmm-agent "
        "answers on vsock port 1024), and exit with CMD's exit status (128+N for signal N). Options may come "
        "before or after SOCK; CMD starts at the first word that is not an option, or after --.",
    )
    _options(p)
    p.add_argument("sock", type=Path, metavar="SOCK", help="the VM's control socket (evmm run --api-sock)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="the command and its arguments")
    p.set_defaults(func=run)


def split_command(args: argparse.Namespace) -> list[str]:
    """Options written after SOCK (``evmm exec SOCK -it -- sh``) into ``args``; returns the command."""
    after = argparse.ArgumentParser(prog="evmm exec SOCK", add_help=False)
    _options(after, defaults=False)
    after.add_argument("command", nargs=argparse.REMAINDER)
    try:
        late = after.parse_args(args.command)
    except SystemExit:
        raise EvmmError(
            "exec: bad options after SOCK (evmm exec SOCK [-i] [-t] [--env K=V]... -- CMD...)"
        ) from None
    for key, value in vars(late).items():
        if key == "env":
            args.env = [*args.env, *value]
        elif key in ("interactive", "tty"):
            setattr(args, key, getattr(args, key) or value)
        elif key != "command":
            setattr(args, key, value)
    command: list[str] = late.command
    return command[1:] if command[:1] == ["--"] else command


def parse_env(words: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise EvmmError(f"exec: --env {word!r} is not NAME=VALUE")
        env[key] = value
    return env


def run(args: argparse.Namespace) -> int:
    command = split_command(args)
    if not command:
        raise EvmmError("exec: no command given (evmm exec SOCK -- CMD...)")
    return asyncio.run(execute(args, command))


def _size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            # This end is non-blocking (a terminal shared with our stdin): wait until it takes more.
            import select

            select.select([], [fd], [])


async def _pump(stream: object, fd: int) -> None:
    from evmm.sandbox import OutputStream

    assert isinstance(stream, OutputStream)
    async for chunk in stream:
        try:
            _write_all(fd, chunk)
        except BrokenPipeError:
            pass  # nobody reads ours any more (| head): the rest is dropped, as the process keeps running


async def execute(args: argparse.Namespace, command: list[str]) -> int:
    from evmm.loop.terminal import RawTerminal
    from evmm.sandbox import Sandbox

    env = parse_env(args.env)
    if args.tty and "TERM" in os.environ and "TERM" not in env:
        env["TERM"] = os.environ["TERM"]
    size = _size(sys.stdout.fileno()) if args.tty else None
    box = await Sandbox.attach(args.sock, agent_port=args.port)
    loop = asyncio.get_running_loop()
    try:
        proc = await box.exec(
            command,
            stdin=args.interactive,
            tty=args.tty,
            env=env or None,
            cwd=args.cwd,
            user=args.user,
            rows=size[0] if size else None,
            cols=size[1] if size else None,
        )
        raw = args.tty and args.interactive
        with RawTerminal(sys.stdin.fileno()) if raw else contextlib.nullcontext():
            stdin_task = asyncio.ensure_future(_feed(proc.stdin, sys.stdin.fileno())) if proc.stdin else None
            if args.tty:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.add_signal_handler(signal.SIGWINCH, lambda: _resize(proc))
            if not raw:
                for sig in FORWARDED:
                    loop.add_signal_handler(sig, _forward, proc, sig)
            try:
                await asyncio.gather(
                    _pump(proc.stdout, sys.stdout.fileno()), _pump(proc.stderr, sys.stderr.fileno())
                )
                status = await proc.wait()
            finally:
                for sig in (*FORWARDED, signal.SIGWINCH):
                    loop.remove_signal_handler(sig)
                if stdin_task is not None:
                    stdin_task.cancel()
                    await asyncio.gather(stdin_task, return_exceptions=True)
        return status.returncode
    finally:
        await box.close()


def _resize(proc: object) -> None:
    from evmm.sandbox import Process

    assert isinstance(proc, Process)
    size = _size(sys.stdout.fileno())
    if size is not None:
        fut = asyncio.ensure_future(proc.resize(*size))
        fut.add_done_callback(lambda f: f.exception())


def _forward(proc: object, sig: signal.Signals) -> None:
    from evmm.sandbox import Process

    assert isinstance(proc, Process)
    fut = asyncio.ensure_future(proc.signal(sig.name, group=True))
    fut.add_done_callback(lambda f: f.exception())  # it may have ended meanwhile


async def _feed(stdin: object, fd: int) -> None:
    """This process's stdin to CMD's, with the agent's acknowledgements as backpressure; EOF closes it."""
    from evmm.sandbox import StdinWriter

    assert isinstance(stdin, StdinWriter)
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    try:
        loop.add_reader(fd, ready.set)
    except (PermissionError, ValueError):
        # A regular file or /dev/null, which epoll refuses: its reads never wait.
        while data := await asyncio.to_thread(os.read, fd, 1 << 18):
            await stdin.write(data)
        await stdin.close()
        return
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                ready.clear()
                await ready.wait()
                continue
            if not data:
                await stdin.close()
                return
            await stdin.write(data)
    finally:
        loop.remove_reader(fd)
        os.set_blocking(fd, True)
