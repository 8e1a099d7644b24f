"""A built machine at run time: its vCPU threads, its reactor, and one way to stop it from any thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.devices.bus import Bus
from evmm.errors import ConfigError, EvmmError, KvmError
from evmm.log import log
from evmm.loop.channel import ExitChannel
from evmm.loop.vcpu_thread import StopRequest, VcpuState, VcpuThread
from evmm.machine.config import MachineConfig
from evmm.machine.devices import Devices
from evmm.machine.lifecycle import Lifecycle
from evmm.memory import GuestMemory
from evmm.record import record
from evmm.startup import Laps

if TYPE_CHECKING:
    from evmm.devices.virtio.console import VirtioConsole
    from evmm.kvm import Kvm, Vcpu, Vm
    from evmm.machine.hotplug import HotplugSlot
    from evmm.machine.pci_devices import PciDevices

JOIN_TIMEOUT = 5.0


def process_age() -> float | None:
    """Seconds since this process started (proc(5): /proc/self/stat field 22, in clock ticks since boot)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _registers(t: VcpuThread, paused: bool) -> dict[str, int] | None:
    """A parked vCPU's instruction pointer, stack and control registers (None while it runs).

    Only in a paused machine, and only a vCPU that is parked: KVM_GET_REGS waits for the vCPU's mutex, which
    KVM_RUN holds, so asking a running one would block the reactor until its next exit.  ``paused`` (the
    machine's, changed only on the reactor, where this runs) closes the window after a resume in which a
    thread still says PAUSED on its way back into KVM_RUN.  What a hung guest is doing is the first question;
    pausing a few times and reading RIP against the kernel's symbols answers it.
    """
    if not paused or t.state is not VcpuState.PAUSED:
        return None
    try:
        regs, sregs = t.vcpu.get_regs(), t.vcpu.get_sregs()
    except KvmError:
        return None
    return {
        "rip": regs.rip,
        "rsp": regs.rsp,
        "rflags": regs.rflags,
        "cr0": sregs.cr0,
        "cr2": sregs.cr2,
        "cr3": sregs.cr3,
        "cr4": sregs.cr4,
        "efer": sregs.efer,
    }


@record
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
    devices: Devices = field(default_factory=Devices)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)  # what devices were given to stop the machine
    closers: list[Callable[[], None]] = field(default_factory=list)
    laps: Laps | None = None  # the start-up so far, logged (-v) when vCPU 0 first runs


class Machine:
    def __init__(self, parts: MachineParts, loop: asyncio.AbstractEventLoop) -> None:
        self.parts = parts
        self.config = parts.config
        self.loop = loop
        self.devices = parts.devices
        self._lifecycle = parts.lifecycle
        self._stopped: asyncio.Future[StopRequest] = loop.create_future()
        self._state_waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self.started_at = 0.0
        self.paused = False
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._channels = [ExitChannel(loop, f"vcpu{v.index}") for v in parts.vcpus]
        self.threads = [
            VcpuThread(v, parts.pio, parts.mmio, ch, self.stop, self._vcpu_state_threadsafe)
            for v, ch in zip(parts.vcpus, self._channels, strict=True)
        ]
        self._lifecycle.attach(self._stopping, self._booted)
        if self.devices.pci is not None:
            self.devices.pci.attach(self.emit)

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> StopRequest:
        """Start every vCPU and return what stopped the machine."""
        self.started_at = time.monotonic()  # the boot marker is timed from here
        for t in self.threads:
            t.start()
        self.emit("state-changed", {"state": "running"})
        return await self._stopped

    # ---- events (reactor) --------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``listener(event, data)`` on the reactor for every machine event; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data)
            except Exception as e:  # a broken client must not break the machine
                log.debug("event listener failed: %s", e)

    def stop(self, code: int, message: str) -> None:
        """Stop the machine; callable from any thread, and the first reason wins."""
        self._lifecycle.stop(code, message)

    @property
    def stop_request(self) -> StopRequest | None:
        return self._lifecycle.stop_request

    def _stopping(self, request: StopRequest) -> None:
        """The lifecycle's first stop request, on the thread that made it."""
        for t in self.threads:
            t.request_stop()
        try:
            self.loop.call_soon_threadsafe(self._on_stop, request)
        except RuntimeError:  # the loop is already closed: nothing left to wake
            pass

    def _on_stop(self, request: StopRequest) -> None:
        for ch in self._channels:
            ch.close()
        if not self._stopped.done():
            self.emit("state-changed", {"state": "stopped"})
            self.emit("shutdown", {"code": request.code, "reason": request.message})
            self._stopped.set_result(request)

    def _booted(self, at: float) -> None:
        """The guest's init wrote the boot-timer register (any thread); log it and tell subscribers."""
        ms = (at - self.started_at) * 1000
        log.debug("guest boot marker after %.1f ms", ms)
        try:
            self.loop.call_soon_threadsafe(self.emit, "boot-marker", {"ms": round(ms, 1)})
        except RuntimeError:
            pass

    @property
    def boot_marker_at(self) -> float | None:
        return self._lifecycle.boot_marker_at

    @property
    def boot_time_ms(self) -> float | None:
        if self.boot_marker_at is None:
            return None
        return (self.boot_marker_at - self.started_at) * 1000

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0

    # ---- guest-visible requests (reactor) ----------------------------------------------------------------

    def power_button(self) -> None:
        """Press the ACPI power button (a GED event, as QEMU microvm's system_powerdown does)."""
        pm = self.devices.acpi_pm
        if pm is None:
            raise EvmmError("this machine has no ACPI power button")
        pm.power_button()

    def ctrl_alt_del(self) -> bool:
        """Send Ctrl-Alt-Del through the i8042, as Firecracker's SendCtrlAltDel does."""
        kbd = self.devices.i8042
        return kbd.ctrl_alt_del() if kbd is not None else False

    def virtio_console(self) -> VirtioConsole | None:
        """The ``--virtio-console`` device, if the VM has one."""
        return self.devices.virtio_console

    def describe(self) -> dict[str, Any]:
        """Configuration and live state, for query-vm."""
        cfg = self.config
        return {
            "state": self.state,
            "board": cfg.board,
            "kernel": str(cfg.kernel),
            "initrd": str(cfg.initrd) if cfg.initrd else None,
            "cmdline": self.parts.cmdline,
            "memory": cfg.memory,
            "uptime": round(self.uptime, 3),
            "boot_time_ms": None if self.boot_time_ms is None else round(self.boot_time_ms, 1),
            "vcpus": [
                {
                    "index": t.index,
                    "state": t.state.value,
                    "exits": t.exit_count + t.vcpu.hooked_exits,
                    "fast_exits": t.vcpu.hooked_exits,  # answered in C by an exit hook (the UART's)
                    "registers": _registers(t, self.paused),
                }
                for t in self.threads
            ],
            "memory_regions": [{"gpa": r.gpa, "size": r.size} for r in self.parts.memory.regions],
            "devices": self.device_list(),
            **({"pci": self.devices.pci.describe()} if self.devices.pci is not None else {}),
        }

    # ---- hot-replace (reactor) ---------------------------------------------------------------------------

    def hotplug_slots(self) -> list[dict[str, Any]]:
        return [slot.describe() for slot in self.devices.slots]

    def _slot(self, slot_id: str) -> HotplugSlot:
        for slot in self.devices.slots:
            if slot.id == slot_id:
                return slot
        known = ", ".join(s.id for s in self.devices.slots) or "none: start evmm run with --hotplug blk=N"
        raise ConfigError(f"no hot-replace slot {slot_id!r} (slots: {known})")

    def replace_device(self, slot_id: str, spec: DriveSpec | NetSpec) -> dict[str, Any]:
        """Fill (or refill) a slot's backend while the guest runs; raises EvmmError with one line."""
        slot = self._slot(slot_id)
        slot.fill(spec)
        self._device_changed(slot, "replaced")
        return slot.describe()

    def remove_device(self, slot_id: str) -> dict[str, Any]:
        slot = self._slot(slot_id)
        slot.empty()
        self._device_changed(slot, "removed")
        return slot.describe()

    def _device_changed(self, slot: HotplugSlot, action: str) -> None:
        self.emit(
            "device-changed", {"slot": slot.id, "kind": slot.kind, "action": action, "backend": slot.backend}
        )

    # ---- PCI hotplug, the standard board (reactor) -------------------------------------------------------------

    def _pci(self) -> PciDevices:
        if self.devices.pci is None:
            raise ConfigError("this machine has no PCI bus: start evmm run with --machine standard")
        return self.devices.pci

    def pci_add(self, name: str, spec: DriveSpec | NetSpec) -> dict[str, Any]:
        """Hot-add a virtio-blk or virtio-net device; the guest finds it through an ACPI Device Check."""
        from evmm.machine.pci_devices import make_device

        pci = self._pci()
        slot = pci.add(name, make_device(spec, len(pci.names())), hot=True)
        backend = str(spec.path) if isinstance(spec, DriveSpec) else spec.tap or f"fd {spec.fd}"
        self.emit("device-changed", {"slot": name, "action": "added", "backend": backend})
        return {"id": name, "bdf": f"00:{slot:02x}.0"}

    async def pci_remove(self, name: str, timeout: float) -> dict[str, Any]:
        """Ask the guest to eject ``name`` and wait for it (``asyncio.TimeoutError`` after ``timeout``)."""
        await self._pci().remove(name, timeout)
        return {"id": name}

    def pci_topology(self) -> list[dict[str, Any]]:
        return self._pci().describe()

    def device_list(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.parts.mmio.mappings() + self.parts.pio.mappings():
            entry: dict[str, Any] = {"name": m.name, "base": m.base, "length": m.length}
            describe = getattr(m.device, "describe", None)
            if callable(describe):
                entry.update(describe())
            out.append(entry)
        return out

    @property
    def state(self) -> str:
        if self.stop_request is not None:
            return "stopped"
        if self.paused:
            return "paused"
        return "running" if self.started_at else "created"

    # ---- pause / resume (reactor) ----------------------------------------------------------------------

    async def pause(self) -> None:
        """Return once every vCPU is out of KVM_RUN and parked, and announce it (``state-changed``)."""
        self.paused = True
        for t in self.threads:
            t.request_pause()
        await self._wait_for(
            lambda: all(t.state in (VcpuState.PAUSED, VcpuState.STOPPED) for t in self.threads)
        )
        if self.state == "paused":  # not once stopped: the stop announces itself
            self.emit("state-changed", {"state": "paused"})

    async def resume(self) -> None:
        """Return once every vCPU runs again, and announce it (``state-changed``)."""
        self.paused = False
        for t in self.threads:
            t.resume()
        await self._wait_for(
            lambda: all(t.state in (VcpuState.RUNNING, VcpuState.STOPPED) for t in self.threads)
        )
        if self.state == "running":
            self.emit("state-changed", {"state": "running"})

    async def _wait_for(self, cond: Callable[[], bool]) -> None:
        if cond():
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._state_waiters.append((cond, fut))
        await fut

    def _vcpu_state_threadsafe(self, index: int, state: VcpuState) -> None:
        laps = self.parts.laps
        with contextlib.suppress(RuntimeError):
            if laps is not None and index == 0 and state is VcpuState.RUNNING:
                # On vCPU 0's thread, the moment before its first KVM_RUN; the reactor logs it, because this
                # thread's seccomp filter has no open(2) for /proc/self/stat (evmm.confine.policy).
                self.parts.laps = None
                self.loop.call_soon_threadsafe(self._log_startup, laps, time.monotonic())
            self.loop.call_soon_threadsafe(self._check_waiters)

    def _log_startup(self, laps: Laps, first_run: float) -> None:
        """-v: the VMM's own start-up (interpreter, imports, building the VM), what a serverless launch pays
        before the guest runs at all.  The process's age is in clock ticks (proc(5): 10 ms here)."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        age = process_age()
        if age is not None:
            age -= time.monotonic() - first_run  # the age at the first KVM_RUN, not now
        since = f"; {age * 1000:.0f} ms since exec" if age is not None else ""
        log.debug("%s%s", laps.line(first_run), since)

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
        for t in self.threads:
            log.debug(
                "vcpu%d: %d exits to userspace: %d answered in C by the UART's exit hook, %d served on the "
                "reactor, the rest on the vCPU thread",
                t.index,
                t.exit_count + t.vcpu.hooked_exits,
                t.vcpu.hooked_exits,
                t.reactor_calls,
            )
        if self.boot_time_ms is not None:
            log.debug("boot marker at %.1f ms; stopped after %.1f s", self.boot_time_ms, self.uptime)
        for closer in reversed(self.parts.closers):
            closer()
        if not stuck:
            for v in self.parts.vcpus:
                v.close()
            self.parts.vm.close()
            self.parts.kvm.close()
            self.parts.memory.close()
        return stuck
