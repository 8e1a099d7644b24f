"""Drive a VMM's serial console through pipes, as a person at the terminal would, for linux-tier tests.

``Guest`` spawns the VMM (``evmm run`` or QEMU) in its own process group with its console on stdin/stdout,
reads the console on a thread into one log, and lets a test ``expect`` output, ``sendline`` input, ``run`` a
shell command for its output and status, and ``wait_exit`` for the VMM's exit code.  The VMM is always killed
at ``close`` (the fixtures in tests/conftest.py close every guest and attach its log to a failing test).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from evmm.assets import GuestAssets

READY = "evmm-guest: ready"
PROMPT = re.compile(r"evmm:[^\n]*# ")
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
    """


# What Linux prints when it dies (arch/x86/kernel/dumpstack.c, traps.c, kernel/panic.c).
KERNEL_CRASH = re.compile(
    r"^\[[ \d.]+\] (?:Oops|BUG|general protection fault|int3|invalid opcode|double fault"
    r"|Kernel panic - not syncing|kernel BUG at)\b",
    re.MULTILINE,
)
# Once a crash starts printing, how long to let the rest of its report arrive before giving up on the guest.
CRASH_GRACE = 5.0


# Loaded before any fork: the child of a threaded parent must not dlopen (a lock held at fork would deadlock).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: no VMM outlives the test run


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
    kernel: Path, initrd: Path, *, cpus: int = 1, memory: str = "256M", append: str | None = None
) -> list[str]:
    return [
        *(sys.executable, "-m", "evmm", "run"),
        *("--kernel", str(kernel), "--initrd", str(initrd)),
        *("--append", kernel_args() if append is None else append),
        *("--memory", memory, "--cpus", str(cpus)),
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


class Guest:
    """A VMM process whose serial console is this object's pipes."""

    def __init__(self, argv: Sequence[str], name: str = "guest") -> None:
        self.argv = list(argv)
        self.name = name
        self._buffer = bytearray()
        self._pos = 0  # expect() searches from here
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-console", daemon=True)
        self._reader.start()

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while data := os.read(fd, 65536):
            with self._cond:
                self._buffer += data
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def log(self) -> str:
        """Everything the console printed so far, with the serial line's \\r\\n made plain newlines."""
        with self._cond:
            return bytes(self._buffer).decode(errors="replace").replace("\r\n", "\n")

    def _tail(self, lines: int = 30) -> str:
        with self._cond:
            text = bytes(self._buffer).decode(errors="replace").replace("\r\n", "\n")
        tail = text.splitlines()[-lines:]
        return "\n".join(f"  | {ln}" for ln in tail) or "  | (no console output)"

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` in output not yet consumed; consume up to the end of the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Positions count characters of the normalised log, which only ever grows at its end.
                text = bytes(self._buffer).decode(errors="replace").replace("\r\n", "\n")
                m = regex.search(text, self._pos)
                if m is not None:
                    self._pos = m.end()
                    return m
                crashed = self._crashed_booting(text)
                if crashed and deadline > time.monotonic() + CRASH_GRACE:
                    deadline = time.monotonic() + CRASH_GRACE  # it will not get better: finish soon
                if self._eof:
                    status = self.proc.wait()
                    kind = GuestKernelCrash if crashed else GuestExited
                    raise kind(
                        f"{self.name}: VMM exited ({status}) before {regex.pattern!r} appeared"
                        f"{' (the guest kernel crashed booting)' if crashed else ''}\n{self._tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if crashed:
                        raise GuestKernelCrash(
                            f"{self.name}: the guest kernel crashed before {READY!r}\n{self._tail(60)}"
                        )
                    raise GuestTimeout(
                        f"{self.name}: no {regex.pattern!r} within {timeout:g} s\n{self._tail()}"
                    )
                self._cond.wait(remaining)

    @staticmethod
    def _crashed_booting(text: str) -> bool:
        """The kernel died before the guest's init printed its ready line."""
        crash = KERNEL_CRASH.search(text)
        return crash is not None and READY not in text[: crash.start()]

    def sendline(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise GuestExited(f"{self.name}: VMM exited; cannot send {text!r}\n{self._tail()}") from None

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

    def wait_exit(self, timeout: float) -> int:
        """The VMM's exit status, waiting at most ``timeout`` seconds for it to exit."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(
                f"{self.name}: VMM still running {timeout:g} s later\n{self._tail()}"
            ) from None
        self._reader.join(5)
        return status

    def close(self) -> None:
        """Kill the VMM; an error when it does not die (a vCPU stuck in the kernel), naming what the kernel said."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(KILL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"{self.name}: the VMM (pid {self.proc.pid}) is still there {KILL_TIMEOUT:g} s after SIGKILL, "
                f"stuck in the kernel; the kernel's last messages:\n{kernel_messages()}"
            ) from None
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._reader.join(5)
