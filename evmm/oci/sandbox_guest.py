"""The real guest of evmm-oci: an ``evmm run`` VMM and evmm-agent in it, through evmm.sandbox's pieces.

The VM is booted with the container's shares (``--fs``, evmm's virtio-fs) and its tap (``--net tap=``: the
VMM runs in the container's network namespace, where the monitor made the tap); the guest side then mounts
each share under ``SHARES/TAG`` and runs the plan's setup commands (the NIC's addresses and routes, sysctls)
in the VM, outside any container.  The container's processes are the agent's (``exec`` with its
``container`` map for the first, ``join`` for the others).

The VMM process (``VmmProcess``) and the agent connection (``AgentClient``) are used directly rather than
through ``Sandbox``: the monitor needs the VMM's pid and its exit, which ``Sandbox`` keeps to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from evmm.errors import EvmmError
from evmm.oci.guest import STDERR, STDOUT, ExitStatus, ProcessRequest, VmPlan
from evmm.oci.plan import SHARES
from evmm.sandbox.client import AgentClient
from evmm.sandbox.process import Process
from evmm.sandbox.spec import Container, ExecSpec, Mount, Rlimit, User
from evmm.sandbox.vmm import VmmProcess, VmOptions

BOOT_TIMEOUT = 300.0  # the agent's first answer; a boot in the TCG test host takes 5-60 s
SETUP_TIMEOUT = 60.0
MERGE_LIMIT = 1 << 20  # output bytes read from the agent and not yet written out, before the readers wait


class SandboxProcess:
    """A guest process; its two streams merged into one, in the order the agent's events came."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self._queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self._queued = 0
        self._room = asyncio.Event()
        self._room.set()
        self._open = 2
        self._readers = [
            asyncio.ensure_future(self._read(STDOUT, proc.stdout)),
            asyncio.ensure_future(self._read(STDERR, proc.stderr)),
        ]

    async def _read(self, stream: int, source: Any) -> None:
        # Each reader waits on its stream and passes a chunk on at once, so chunks leave in the order the
        # agent's events arrived (the loop wakes waiters first come, first served); only past MERGE_LIMIT,
        # with a slow writer on the host side, do they wait, and the agent's window slows the process.
        try:
            while (chunk := await source.read_chunk()) is not None:
                while self._queued > MERGE_LIMIT:
                    self._room.clear()
                    await self._room.wait()
                self._queued += len(chunk)
                self._queue.put_nowait((stream, chunk))
        except EvmmError:
            pass  # the connection was lost: wait() says so
        finally:
            self._open -= 1
            if self._open == 0:
                self._queue.put_nowait(None)

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        while (item := await self._queue.get()) is not None:
            self._queued -= len(item[1])
            self._room.set()
            yield item

    async def write(self, data: bytes) -> None:
        if self.proc.stdin is not None:
            await self.proc.stdin.write(data)

    async def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            await self.proc.stdin.close()

    async def signal(self, signum: int) -> None:
        await self.proc.signal(signum)

    async def resize(self, rows: int, cols: int) -> None:
        await self.proc.resize(rows, cols)

    async def wait(self) -> ExitStatus:
        status = await self.proc.wait()
        if status.code is None:
            sig = status.signal or 0
            return ExitStatus(128 + sig, sig)
        return ExitStatus(status.code)


class SandboxGuest:
    def __init__(self, vmm: VmmProcess, agent: AgentClient) -> None:
        self.vmm = vmm
        self.agent = agent
        self.vmm_pid = vmm.proc.pid
        self.first_pid: int | None = None

    async def run(self, argv: tuple[str, ...], what: str) -> None:
        """A setup command in the VM (outside any container); ``EvmmError`` with its output if it fails."""
        proc = await self.agent.exec(ExecSpec(argv=argv))
        out, err = await asyncio.wait_for(
            asyncio.gather(proc.stdout.read(), proc.stderr.read()), SETUP_TIMEOUT
        )
        status = await proc.wait()
        if status.code != 0:
            text = (err or out).decode(errors="replace").strip().splitlines()
            raise EvmmError(f"{what}: `{' '.join(argv)}` failed{': ' + text[-1] if text else ''}")

    async def exec(self, request: ProcessRequest) -> SandboxProcess:
        container = None
        if request.container is not None:
            c = request.container
            container = Container(
                rootfs=c["rootfs"],
                mounts=tuple(
                    Mount(
                        target=m["target"],
                        type=None if m["type"] == "bind" else m["type"],
                        source=m.get("source"),
                        options=tuple(m.get("options", ())),
                    )
                    for m in c["mounts"]
                ),
                hostname=c.get("hostname"),
                namespaces=tuple(c["namespaces"]),
                readonly_root=bool(c.get("readonly_root")),
            )
        if request.join and self.first_pid is None:
            raise EvmmError("exec: the container's process has not started")
        spec = ExecSpec(
            argv=request.argv,
            env=request.env,
            cwd=request.cwd,
            user=User(request.uid, request.gid, request.groups),
            umask=request.umask,
            rlimits=tuple(Rlimit(t, soft, hard) for t, soft, hard in request.rlimits),
            tty=request.tty,
            rows=request.rows if request.tty else None,
            cols=request.cols if request.tty else None,
            stdin=request.stdin,
            container=container,
            join=self.first_pid if request.join else None,
        )
        proc = await self.agent.exec(spec)
        if container is not None:
            self.first_pid = proc.pid
        return SandboxProcess(proc)

    async def _control(self, method: str) -> None:
        from evmm.control import Client

        async with Client(self.vmm.api_sock) as control:
            await control.call(method)

    async def pause(self) -> None:
        await self._control("pause")

    async def resume(self) -> None:
        await self._control("resume")

    async def stopped(self) -> str:
        await self.vmm.proc.wait()
        return str(self.vmm.failure("the VMM"))

    async def close(self) -> None:
        with contextlib.suppress(EvmmError, OSError):
            await self.agent.close()
        await self.vmm.stop()


class SandboxGuestFactory:
    async def boot(self, plan: VmPlan) -> SandboxGuest:
        options = VmOptions(
            memory=f"{plan.memory >> 20}M",
            cpus=plan.vcpus,
            kernel=plan.kernel,
            initrd=plan.initrd,
            append=" ".join(("console=ttyS0", "quiet", *plan.append)) if plan.append else None,
            net=(f"tap={plan.tap},mac={plan.mac}",) if plan.tap else (),
            fs=tuple(
                f"path={s.path},tag={s.tag}" + (",readonly=on" if s.readonly else "") for s in plan.shares
            ),
            boot_timeout=BOOT_TIMEOUT,
            console_log=plan.console_log,
        )
        vmm = await VmmProcess.start(options)
        try:
            agent = await AgentClient.connect_when_ready(
                vmm.vsock, options.agent_port, timeout=BOOT_TIMEOUT, alive=lambda: vmm.running
            )
        except BaseException as e:
            why = vmm.failure("the VM did not start") if not vmm.running else None
            await vmm.stop()
            if why is not None:
                raise why from None
            raise EvmmError(f"the VM did not start: {e}") from None
        guest = SandboxGuest(vmm, agent)
        try:
            for share in plan.shares:
                where = str(SHARES / share.tag)
                await guest.run(("mkdir", "-p", where), "guest setup")
                await guest.run(("mount", "-t", "virtiofs", share.tag, where), f"mounting share {share.tag}")
            for cmd in plan.guest_setup:
                await guest.run(cmd, "guest setup")
        except BaseException:
            await guest.close()
            raise
        return guest
