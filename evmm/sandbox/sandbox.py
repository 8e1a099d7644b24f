"""``evmm.Sandbox``: a microVM to run programs in, from asyncio (the default loop or uvloop).

    async with evmm.Sandbox(memory="256M", cpus=1) as box:     # boots, waits for the agent
        r = await box.run(["sh", "-c", "echo hi; exit 3"])     # r.exit_code == 3, r.stdout == b"hi\\n"
        p = await box.exec(["cat"], stdin=True)
        ...

The VM is an ``evmm run`` process of its own (evmm/sandbox/vmm.py), driven through its control socket
(pause, resume, quit) and the guest agent (evmm-agent, over vsock).  ``Sandbox.attach(api_sock)`` drives a
VM that is already running; closing such a sandbox leaves the VM running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from evmm.errors import EvmmError
from evmm.sandbox.client import AgentClient, AgentError
from evmm.sandbox.files import Files
from evmm.sandbox.process import ExecResult, Process
from evmm.sandbox.spec import Container, ExecSpec, Rlimit, User, environment
from evmm.sandbox.vmm import VmmProcess, VmOptions, describe_vsock


class Sandbox:
    def __init__(
        self,
        *,
        memory: str = "256M",
        cpus: int = 1,
        drives: Sequence[str] = (),
        kernel: str | Path | None = None,
        initrd: str | Path | None = None,
        append: str | None = None,
        net: Sequence[str] = (),
        fs: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        agent_port: int = 1024,
        boot_timeout: float = 120.0,
        console_log: str | Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """The VM's options (``evmm run``'s); ``extra_args`` are passed on as they are.  ``console_log``: a
        file for the VM's console and evmm's messages (by default a private one, gone after ``close``);
        ``command``: what runs evmm (``python -m evmm`` by default)."""
        self.options = VmOptions(
            memory=memory,
            cpus=cpus,
            kernel=Path(kernel) if kernel is not None else None,
            initrd=Path(initrd) if initrd is not None else None,
            append=append,
            drives=tuple(drives),
            net=tuple(net),
            fs=tuple(fs),
            extra_args=tuple(extra_args),
            agent_port=agent_port,
            boot_timeout=boot_timeout,
            console_log=Path(console_log) if console_log is not None else None,
        )
        if command is not None:
            self.options = dataclasses.replace(self.options, command=tuple(command))
        self._vmm: VmmProcess | None = None
        self._agent: AgentClient | None = None
        self.api_sock: Path | None = None

    # ---- life cycle -------------------------------------------------------------------------------------

    async def start(self) -> Sandbox:
        """Boot the VM and wait until its agent answers (``boot_timeout``)."""
        vmm = await VmmProcess.start(self.options)
        self._vmm = vmm
        self.api_sock = vmm.api_sock
        try:
            self._agent = await AgentClient.connect_when_ready(
                vmm.vsock,
                self.options.agent_port,
                timeout=self.options.boot_timeout,
                alive=lambda: vmm.running,
            )
        except BaseException as e:
            # Read why before stop() removes the VMM's directory and its log.
            why = vmm.failure("sandbox") if not vmm.running else EvmmError(f"sandbox: {e}")
            await vmm.stop()
            self._vmm = None
            if isinstance(e, EvmmError):
                raise why from None
            raise
        return self

    @classmethod
    async def attach(cls, api_sock: str | Path, *, agent_port: int = 1024, timeout: float = 10.0) -> Sandbox:
        """A sandbox for a VM already running with ``--api-sock`` and ``--vsock``; closing it leaves the VM."""
        from evmm.control import Client

        box = cls(agent_port=agent_port)
        box.api_sock = Path(api_sock)
        async with Client(api_sock) as control:
            vm = await control.call("query-vm")
        where = describe_vsock(vm.get("devices", []) if isinstance(vm, dict) else [])
        if where is None:
            raise EvmmError(f"{api_sock}: the VM has no vsock device (start it with --vsock cid=N,path=SOCK)")
        kind, value = where
        if kind == "path":
            box._agent = await AgentClient.connect_when_ready(str(value), agent_port, timeout=timeout)
        else:
            box._agent = await AgentClient.vsock(int(str(value)), agent_port)
        return box

    async def close(self) -> None:
        """Disconnect (the agent kills this client's processes); a VM this sandbox started is stopped."""
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._vmm is not None:
            await self._vmm.stop()
            self._vmm = None

    async def __aenter__(self) -> Sandbox:
        if self._agent is None:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def agent(self) -> AgentClient:
        if self._agent is None or not self._agent.connected:
            why = "it is closed" if self._agent is None else "the agent connection was lost"
            if self._vmm is not None and not self._vmm.running:
                raise self._vmm.failure("sandbox: the VM has stopped")
            raise EvmmError(f"sandbox: {why}")
        return self._agent

    @property
    def files(self) -> Files:
        return self.agent.files

    @property
    def console_log(self) -> Path | None:
        """The VM's serial console and evmm's messages (a sandbox that started its VM)."""
        return None if self._vmm is None else self._vmm.log

    # ---- processes --------------------------------------------------------------------------------------

    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        stdin: bool = False,
        tty: bool = False,
        env: Mapping[str, str] | Sequence[str] | None = None,
        cwd: str | None = None,
        user: User | str | None = None,
        umask: int | None = None,
        rlimits: Sequence[Rlimit] = (),
        rows: int | None = None,
        cols: int | None = None,
        window: int | None = None,
        detach: bool = False,
        container: Container | None = None,
        join: int | None = None,
    ) -> Process:
        """Start a program; returns at once with its ``Process`` (``argv`` a string: run by ``sh -c``).

        ``env``: a mapping is added over the defaults (PATH, HOME, TERM with a tty); a sequence of
        ``NAME=VALUE`` is the whole environment.  ``container`` makes it the first process of a container;
        ``join=PID`` runs it inside PID's container, as ``runc exec`` does.
        """
        words = ("sh", "-c", argv) if isinstance(argv, str) else tuple(argv)
        who = User.parse(user) if isinstance(user, str) else user
        spec = ExecSpec(
            argv=words,
            env=environment(env, tty=tty, uid=who.uid if who else 0),
            cwd=cwd,
            user=who,
            umask=umask,
            rlimits=tuple(rlimits),
            tty=tty,
            rows=rows,
            cols=cols,
            stdin=stdin,
            window=window,
            detach=detach,
            container=container,
            join=join,
        )
        return await self.agent.exec(spec)

    async def run(
        self,
        argv: Sequence[str] | str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ExecResult:
        """Run a program to its end and return its output and exit; ``timeout`` kills it (TimeoutError)."""
        proc = await self.exec(argv, stdin=stdin is not None, **kwargs)

        async def feed() -> None:
            if proc.stdin is not None and stdin is not None:
                # A process may end without reading all its input (head -c1): as subprocess's
                # communicate() does, that is not an error of the run.
                with contextlib.suppress(AgentError):
                    await proc.stdin.write(stdin)
                    await proc.stdin.close()

        async def whole() -> ExecResult:
            out, err, _ = await asyncio.gather(proc.stdout.read(), proc.stderr.read(), feed())
            status = await proc.wait()
            return ExecResult(status.code, status.signal, out, err)

        try:
            return await asyncio.wait_for(whole(), timeout)
        except TimeoutError:
            with contextlib.suppress(EvmmError):
                await proc.kill()
            raise

    # ---- the VM -----------------------------------------------------------------------------------------

    async def _control(self, method: str) -> Any:
        from evmm.control import Client

        if self.api_sock is None:
            raise EvmmError(f"sandbox: {method}: no control socket (the sandbox is not started)")
        async with Client(self.api_sock) as control:
            return await control.call(method)

    async def pause(self) -> None:
        """Stop the VM's vCPUs (the agent stops answering until ``resume``)."""
        await self._control("pause")

    async def resume(self) -> None:
        await self._control("resume")
