"""A vCPU thread: ``KVM_RUN`` in a loop, one dispatch on the exit, an explicit Running/Paused/Stopped state.

Port I/O and MMIO exits go to the device on the bus (``Bus.read``/``write``), which serves each register on
the thread its device declared (``OnVcpu``): the few a device guards itself (the UART, the ACPI power block,
virtio-mmio's interrupt status and acknowledge) right here, every other one on the reactor thread through the
``ExitChannel``, the vCPU waiting for the answer before re-entering the guest, because the guest's next
instruction may depend on it.  The GIL is released while KVM_RUN runs, so vCPU threads and the reactor
overlap.
"""

from __future__ import annotations

import contextlib
import enum
import signal
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evmm import exitcodes
from evmm.confine.thread import confine_thread
from evmm.devices.bus import Bus
from evmm.errors import EvmmError
from evmm.kvm import exits
from evmm.loop.channel import ChannelClosed, ExitChannel
from evmm.record import record

if TYPE_CHECKING:
    from evmm.kvm import Vcpu

# The signal that knocks a vCPU thread out of KVM_RUN (with immediate_exit closing the race where it arrives
# just before the ioctl).  Its Python handler does nothing; the main thread installs it before vCPUs start.
KICK_SIGNAL = signal.SIGUSR1


def name_os_thread(name: str) -> None:
    """Name the calling thread for the kernel (``top -H``, ``/proc/PID/task/TID/comm``; at most 15 bytes):
    Python 3.11 names its threads only for itself, so every thread would otherwise show as the interpreter.
    Written to ``/proc/thread-self/comm`` (proc(5); what prctl(PR_SET_NAME) sets), which needs no ctypes."""
    with open("/proc/thread-self/comm", "wb", buffering=0) as comm:
        comm.write(name.encode()[:15])


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@record(frozen=True)
class StopRequest:
    code: int
    message: str


StopFn = Callable[[int, str], None]


class VcpuThread:
    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        channel: ExitChannel,
        stop: StopFn,
        on_state: Callable[[int, VcpuState], None],
    ) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index
        self._pio = pio
        self._mmio = mmio
        self._channel = channel
        self._stop = stop
        self._on_state = on_state
        self._cond = threading.Condition()
        self._want_pause = False
        self._want_stop = False
        self.state = VcpuState.CREATED
        self.exit_count = 0  # exits to userspace
        self.reactor_calls = 0  # of which served on the reactor (the rest on this thread)
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    # ---- control, from any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:
            return True  # never started (the build failed after creating it)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def request_pause(self) -> None:
        with self._cond:
            self._want_pause = True
        self._kick()

    def resume(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def request_stop(self) -> None:
        with self._cond:
            self._want_stop = True
            self._cond.notify_all()
        self._kick()

    def _kick(self) -> None:
        self.vcpu.set_immediate_exit(True)
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    # ---- the thread ----------------------------------------------------------------------------------------

    def _set_state(self, state: VcpuState) -> None:
        self.state = state
        self._on_state(self.index, state)

    def _main(self) -> None:
        name_os_thread(f"evmm-vcpu{self.index}")
        confine_thread("vcpu")
        # Only the main thread should run Python signal handlers; block the async ones here so a Ctrl-C is
        # never delivered to a vCPU thread (the kick signal stays unblocked to interrupt KVM_RUN).
        signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}
        )
        self._set_state(VcpuState.RUNNING)
        try:
            self._loop()
        except ChannelClosed:
            pass
        except EvmmError as e:
            self._stop(exitcodes.EXIT_KVM_ERROR, str(e))
        except Exception as e:  # a bug in evmm: stop the VM with the place it happened, not a dead thread
            where = traceback.extract_tb(e.__traceback__)[-1]
            self._stop(
                exitcodes.EXIT_VMM_FAULT,
                f"vCPU {self.index}: internal error {type(e).__name__}: {e} "
                f"({where.filename}:{where.lineno})",
            )
        finally:
            self._set_state(VcpuState.STOPPED)

    def _park_if_asked(self) -> bool:
        """Handle pause/stop requests between runs; returns False when the thread should end."""
        with self._cond:
            if self._want_stop:
                return False
            if not self._want_pause:
                self.vcpu.set_immediate_exit(False)
                return True
        self._set_state(VcpuState.PAUSED)
        with self._cond:
            while self._want_pause and not self._want_stop:
                self._cond.wait()
            if self._want_stop:
                return False
            self.vcpu.set_immediate_exit(False)
        self._set_state(VcpuState.RUNNING)
        return True

    def _loop(self) -> None:
        vcpu = self.vcpu
        io_in, io_out, mmio_r, mmio_w = exits.IoIn, exits.IoOut, exits.MmioRead, exits.MmioWrite
        pio, mmio, on_reactor = self._pio, self._mmio, self._on_reactor
        if not self._park_if_asked():
            return
        while True:
            ex = vcpu.run()
            self.exit_count += 1
            t = type(ex)
            if t is io_out:
                assert isinstance(ex, io_out)
                if ex.count == 1:
                    pio.write(ex.port, ex.size, int.from_bytes(ex.data, "little"), on_reactor)
                else:
                    pio.write_string(ex.port, ex.size, ex.data, on_reactor)
            elif t is io_in:
                assert isinstance(ex, io_in)
                if ex.count == 1:
                    vcpu.complete_io_in(pio.read(ex.port, ex.size, on_reactor).to_bytes(ex.size, "little"))
                else:
                    vcpu.complete_io_in(pio.read_string(ex.port, ex.size, ex.count, on_reactor))
            elif t is mmio_w:
                assert isinstance(ex, mmio_w)
                mmio.write(ex.addr, ex.size, int.from_bytes(ex.data, "little"), on_reactor)
            elif t is mmio_r:
                assert isinstance(ex, mmio_r)
                vcpu.complete_mmio_read(mmio.read(ex.addr, ex.size, on_reactor).to_bytes(ex.size, "little"))
            elif t is exits.Interrupted:
                if not self._park_if_asked():
                    return
            else:
                self._terminal_exit(ex)
                return

    def _terminal_exit(self, ex: exits.VmExit) -> None:
        n = self.index
        if isinstance(ex, exits.Shutdown):
            self._stop(exitcodes.EXIT_TRIPLE_FAULT, f"vCPU {n} shut down (triple fault): the guest crashed")
        elif isinstance(ex, exits.SystemEvent):
            if ex.type == 1:  # KVM_SYSTEM_EVENT_SHUTDOWN
                self._stop(exitcodes.EXIT_GUEST_POWEROFF, "guest powered off")
            elif ex.type == 2:  # KVM_SYSTEM_EVENT_RESET
                self._stop(exitcodes.EXIT_GUEST_RESET, "guest reset")
            else:
                self._stop(exitcodes.EXIT_GUEST_PANIC, f"guest crashed (KVM system event {ex.type})")
        elif isinstance(ex, exits.InternalError | exits.FailEntry):
            self._stop(exitcodes.EXIT_KVM_ERROR, f"vCPU {n}: {ex.describe()}")
        elif isinstance(ex, exits.Hlt):
            # Only without an in-kernel irqchip (tiny test guests): nothing can wake the vCPU again.
            self._stop(exitcodes.EXIT_GUEST_POWEROFF, f"vCPU {n} halted")
        else:
            self._stop(exitcodes.EXIT_KVM_ERROR, f"vCPU {n}: unhandled KVM exit {ex}")

    # ---- dispatch ------------------------------------------------------------------------------------------

    def _on_reactor(self, fn: Callable[..., Any], *args: Any) -> Any:
        """What the buses call for a register the reactor serves: the exit channel, counted."""
        self.reactor_calls += 1
        return self._channel.call(fn, *args)
