"""Drive a VMM's serial console through pipes, as a person at the terminal would, for linux-tier tests.

``Guest`` spawns the VMM (``evmm run`` or QEMU) in its own process group with its console on stdin/stdout,
reads the console on a thread into one log, and lets a test ``expect`` output, ``sendline`` input, ``run`` a
shell command for its output and status, and ``wait_exit`` for the VMM's exit code.  The VMM is always killed
at ``close`` (the fixtures in tests/conftest.py close every guest and attach its log to a failing test).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from evmm.assets import GuestAssets
from evmm.bench.console import PROMPT as PROMPT
from evmm.bench.console import READY as READY
from evmm.bench.console import VmProcess
from evmm.exitcodes import EXIT_TRIPLE_FAULT

# Linux's messages about firmware tables it rejects or repairs (drivers/acpi, "ACPI BIOS Error", "[Firmware Bug]").
ACPI_TROUBLE = re.compile(
    r"ACPI.*(Error|Warning|BIOS bug|FW_BUG|failed)|Firmware Bug.*ACPI|ACPI BIOS", re.IGNORECASE
)


KILL_TIMEOUT = 10.0


def kernel_messages(lines: int = 15) -> str:
    """The end of this (virtual) host's kernel log: where a VMM that cannot be killed is usually explained."""
    try:
        r = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"  | (dmesg: {e})"
    return "\n".join(f"  | {ln}" for ln in r.stdout.splitlines()[-lines:]) or "  | (empty)"


def thread_cpu(pid: int) -> dict[int, tuple[str, str, float]]:
    """Each thread of ``pid``: its name, scheduler state and CPU seconds used so far (proc(5) stat)."""
    out: dict[int, tuple[str, str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        # The name is in parentheses and may hold spaces: the fields after the last ')' are fixed.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, fields[0], (int(fields[11]) + int(fields[12])) / tick)
    return out


class GuestError(AssertionError):
    """The guest did not do what the test expected; the message ends with the console's last lines."""


class GuestTimeout(GuestError):
    pass


class GuestExited(GuestError):
    pass


class GuestKernelCrash(GuestError):
    """The guest's kernel oopsed or panicked before the ready line: the linux tier reruns such a test once.

    Under the KVM test host (an L2 guest of QEMU TCG's emulated SVM) a boot very occasionally dies early in
    the kernel with state no guest code set: seen once in ~40 boots, an int3 inside the double-fault handler
    with CR2 holding a user-space address at a time the guest had no user space, i.e. L1's CR2 leaking into
    L2.  A crash of evmm's making repeats, so it still fails the rerun; the rerun is reported (pytest's ``R``).
    A vCPU that triple-faults (evmm's exit 4, QEMU's unexplained exit 0) counts too, before the ready line
    or after (the same death without the kernel's report; such crashes were seen mid-test under I/O load).
    """


# What Linux prints when it dies (arch/x86/kernel/dumpstack.c, traps.c, kernel/panic.c).
KERNEL_CRASH = re.compile(
    r"^\[[ \d.]+\] (?:Oops|BUG|general protection fault|int3|invalid opcode|double fault"
    r"|Kernel panic - not syncing|kernel BUG at)\b",
    re.MULTILINE,
)
# Once a crash starts printing, how long to let the rest of its report arrive before giving up on the guest.
CRASH_GRACE = 5.0


def tsc_khz() -> int | None:
    """The TSC frequency this (virtual) host measured, for ``tsc_early_khz=`` in nested guests.

    Under the test host (TCG), an L2 guest's TSC calibration against emulated timers is slow and unreliable.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_args(*extra: str) -> str:
    """A quiet serial-console command line (every console byte costs a VM exit) plus ``extra`` words."""
    words = ["console=ttyS0", "quiet"]
    khz = tsc_khz() if os.environ.get("EVMM_IN_TESTHOST") == "1" else None
    if khz:
        words.append(f"tsc_early_khz={khz}")
    return " ".join([*words, *extra])


def evmm_run_argv(
    kernel: Path,
    initrd: Path,
    *,
    cpus: int = 1,
    memory: str = "256M",
    append: str | None = None,
    board: str = "microvm",
) -> list[str]:
    return [
        *(sys.executable, "-m", "evmm", "run"),
        *("--kernel", str(kernel), "--initrd", str(initrd)),
        *("--append", kernel_args() if append is None else append),
        *("--memory", memory, "--cpus", str(cpus)),
        *(("--machine", board) if board != "microvm" else ()),
    ]


def qemu_microvm_argv(
    kernel: Path, initrd: Path, *, cpus: int = 1, memory: str = "256M", append: str | None = None
) -> list[str]:
    """QEMU's microvm board on the same KVM: the reference VMM the default guest must boot on."""
    return [
        *("qemu-system-x86_64", "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host"),
        *("-smp", str(cpus), "-m", memory, "-no-reboot"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"),
        *(
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            kernel_args() if append is None else append,
        ),
    ]


def image(assets: GuestAssets, kind: str) -> Path:
    return {"bzimage": assets.bzimage, "vmlinux": assets.vmlinux}[kind]


class Guest(VmProcess):
    """A VMM process whose serial console is this object's pipes (evmm.bench.console.VmProcess, with the
    tier's errors, text ``expect`` and the guest-kernel crash check)."""

    Timeout = GuestTimeout
    Exited = GuestExited
    Failed = GuestError

    def __init__(self, argv: Sequence[str], name: str = "guest") -> None:
        super().__init__(argv, name)

    @property
    def log(self) -> str:
        """Everything the console printed so far, with the serial line's \\r\\n made plain newlines."""
        return self.output()

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` in output not yet consumed; consume up to the end of the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Positions count characters of the normalised log, which only ever grows at its end.
                text = self._text()
                m = regex.search(text, self._text_pos)
                if m is not None:
                    self._text_pos = m.end()
                    return m
                crashed = self._crashed_booting(text)
                if crashed and deadline > time.monotonic() + CRASH_GRACE:
                    deadline = time.monotonic() + CRASH_GRACE  # it will not get better: finish soon
                if self._eof:
                    status = self.proc.wait()
                    # A triple fault is the same death without the kernel's last words, booting or later
                    # (seen in CI runs: a two-vCPU guest before its first console line; a guest running eight
                    # vsock streams).  evmm reports it as "the guest crashed"; one of evmm's making repeats.
                    crashed = crashed or self._died(status, text)
                    kind = GuestKernelCrash if crashed else GuestExited
                    raise kind(
                        f"{self.name}: VMM exited ({status}) before {regex.pattern!r} appeared"
                        f"{' (the guest crashed)' if crashed else ''}\n{self.tail(30)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if crashed:
                        raise GuestKernelCrash(
                            f"{self.name}: the guest kernel crashed before {READY!r}\n{self.tail(60)}"
                        )
                    break
                self._cond.wait(remaining)
        # Outside the lock: the console reader must go on collecting what the VMM prints while we look.
        state = self.diagnose()
        raise GuestTimeout(
            f"{self.name}: no {regex.pattern!r} within {timeout:g} s\n{self.tail(30)}\n{state}"
        )

    def diagnose(self, interval: float = 1.0) -> str:
        """Where a silent VM is: each VMM thread's state and CPU use over ``interval``, and the Python stack
        of every thread (evmm dumps them on SIGUSR2).  Tells a guest spinning in KVM_RUN (a vCPU thread
        using CPU), a halted or stuck guest (none), and a reactor that stopped serving (its stack)."""
        before = thread_cpu(self.pid)
        end = len(self._buf)
        if "evmm" in " ".join(self.argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGUSR2)
        time.sleep(interval)
        after = thread_cpu(self.pid)
        lines = [f"VMM threads over {interval:g} s (state, CPU ms):"]
        for tid, (name, st, cpu) in sorted(after.items()):
            used = (cpu - before[tid][2]) * 1000 if tid in before else float("nan")
            lines.append(f"  {tid} {name:<16} {st} {used:6.0f}")
        with self._cond:
            dump = bytes(self._buf[end:]).decode(errors="replace").strip()
        if dump:
            lines += ["what the VMM printed since (SIGUSR2: its threads' stacks):", dump[-6000:]]
        return "\n".join(lines)

    _text_pos = 0  # expect() searches the text from here

    def _died(self, status: int, text: str) -> bool:
        """The VMM's exit was the guest dying: evmm's triple-fault exit, or QEMU's unasked reset."""
        return status == EXIT_TRIPLE_FAULT or self._reset_unasked(status, text)

    def _reset_unasked(self, status: int, text: str) -> bool:
        """QEMU run with -no-reboot exited 0, and the kernel never said it was powering off or restarting.

        QEMU turns a guest reset into an exit, and a triple fault (KVM_EXIT_SHUTDOWN) is a reset, so its
        status cannot tell a crash from a poweroff.  The kernel can: before every deliberate power-off,
        halt or restart it prints "reboot: ..." at KERN_EMERG, which ``quiet`` does not hide
        (kernel/reboot.c).  Without that line the guest died: QEMU's equivalent of evmm's exit 4 (seen
        in CI runs in the KVM test host, a QEMU microvm guest gone mid-boot).
        """
        return status == 0 and "-no-reboot" in self.argv and "reboot: " not in text

    @staticmethod
    def _crashed_booting(text: str) -> bool:
        """The kernel died before the guest's init printed its ready line."""
        crash = KERNEL_CRASH.search(text)
        return crash is not None and READY not in text[: crash.start()]

    def run(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell; return its output (without the echoed input) and exit status."""
        token = uuid.uuid4().hex[:12]
        # The quotes keep the echoed command line from matching the markers the guest prints.
        self.sendline(f"echo @@''{token}-begin; {command}; echo @@''{token}-end:$?")
        m = self.expect(re.compile(rf"@@{token}-begin\n(.*?)@@{token}-end:(\d+)\n", re.DOTALL), timeout)
        return m.group(1), int(m.group(2))

    def check(self, command: str, timeout: float = 30.0) -> str:
        """``run`` a command that must succeed; return its output."""
        output, status = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"{self.name}: `{command}` exited {status}:\n{output}")
        return output

    def wait_exit(self, timeout: float) -> int:  # type: ignore[override]
        """The VMM's exit status, waiting at most ``timeout`` seconds for it to exit.

        A guest that died on the way out (evmm's triple-fault exit, QEMU's exit 0 with no "reboot:" line)
        is ``GuestKernelCrash``, as it is while the test waits for output: no test expects one.  Seen in
        the KVM test host: a two-vCPU guest triple-faulting as ``poweroff`` was typed.
        """
        status, _ = super().wait_exit(timeout)
        self._reader.join(5)
        with self._cond:
            text = self._text()
        if self._died(status, text):
            raise GuestKernelCrash(f"{self.name}: VMM exited ({status}): the guest crashed\n{self.tail(30)}")
        return status

    def close(self) -> None:
        """Kill the VMM; an error when it does not die (a vCPU stuck in the kernel), naming what the kernel said."""
        if not self.kill(KILL_TIMEOUT):
            raise GuestError(
                f"{self.name}: the VMM (pid {self.proc.pid}) is still there {KILL_TIMEOUT:g} s after SIGKILL, "
                f"stuck in the kernel; the kernel's last messages:\n{kernel_messages()}"
            )
