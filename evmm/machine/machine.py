"""A built machine at run time: its vCPU threads, its reactor, and one way to stop it from any thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evmm.devices.bus import Bus
from evmm.kvm import Kvm, Vcpu, Vm
from evmm.loop.channel import ExitChannel
from evmm.loop.vcpu_thread import StopRequest, VcpuState, VcpuThread
from evmm.machine.config import MachineConfig
from evmm.memory import GuestMemory

JOIN_TIMEOUT = 5.0


@dataclass
class MachineParts:
    """What the builder made, handed over whole to ``Machine``."""

    config: MachineConfig
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[Vcpu]
    pio: Bus
    mmio: Bus
    cmdline: str = ""
    devices: dict[str, object] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)


class Machine:
    def __init__(self, parts: MachineParts, loop: asyncio.AbstractEventLoop) -> None:
        self.parts = parts
        self.config = parts.config
        self.loop = loop
        self._stop_lock = threading.Lock()
        self.stop_request: StopRequest | None = None
        self._stopped: asyncio.Future[StopRequest] = loop.create_future()
        self._state_waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self.started_at = 0.0
        self.boot_marker_at: float | None = None
        self.paused = False
        self._channels = [ExitChannel(loop, f"vcpu{v.index}") for v in parts.vcpus]
        self.threads = [
            VcpuThread(v, parts.pio, parts.mmio, ch, self.stop, self._vcpu_state_threadsafe)
            for v, ch in zip(parts.vcpus, self._channels, strict=True)
        ]

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> StopRequest:
        """Start every vCPU and return what stopped the machine."""
        self.started_at = time.monotonic()
        for t in self.threads:
            t.start()
        return await self._stopped

    def stop(self, code: int, message: str) -> None:
        """Stop the machine; callable from any thread, and the first reason wins."""
        with self._stop_lock:
            if self.stop_request is not None:
                return
            self.stop_request = StopRequest(code, message)
        for t in self.threads:
            t.request_stop()
        try:
            self.loop.call_soon_threadsafe(self._on_stop)
        except RuntimeError:  # the loop is already closed: nothing left to wake
            pass

    def _on_stop(self) -> None:
        for ch in self._channels:
            ch.close()
        if not self._stopped.done() and self.stop_request is not None:
            self._stopped.set_result(self.stop_request)

    def record_boot_marker(self) -> None:
        if self.boot_marker_at is None:
            self.boot_marker_at = time.monotonic()

    @property
    def state(self) -> str:
        if self.stop_request is not None:
            return "stopped"
        if self.paused:
            return "paused"
        return "running" if self.started_at else "created"

    # ---- pause / resume (reactor) ----------------------------------------------------------------------

    async def pause(self) -> None:
        """Return once every vCPU is out of KVM_RUN and parked."""
        self.paused = True
        for t in self.threads:
            t.request_pause()
        await self._wait_for(
            lambda: all(t.state in (VcpuState.PAUSED, VcpuState.STOPPED) for t in self.threads)
        )

    async def resume(self) -> None:
        self.paused = False
        for t in self.threads:
            t.resume()
        await self._wait_for(
            lambda: all(t.state in (VcpuState.RUNNING, VcpuState.STOPPED) for t in self.threads)
        )

    async def _wait_for(self, cond: Callable[[], bool]) -> None:
        if cond():
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._state_waiters.append((cond, fut))
        await fut

    def _vcpu_state_threadsafe(self, index: int, state: VcpuState) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._check_waiters)

    def _check_waiters(self) -> None:
        still = []
        for cond, fut in self._state_waiters:
            if fut.done():
                continue
            if cond():
                fut.set_result(None)
            else:
                still.append((cond, fut))
        self._state_waiters = still

    # ---- teardown --------------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Join every vCPU thread and release KVM and memory; returns threads that would not stop."""
        stuck = [f"vcpu{t.index}" for t in self.threads if not t.join(JOIN_TIMEOUT)]
        for closer in reversed(self.parts.closers):
            closer()
        if not stuck:
            for v in self.parts.vcpus:
                v.close()
            self.parts.vm.close()
            self.parts.kvm.close()
            self.parts.memory.close()
        return stuck
