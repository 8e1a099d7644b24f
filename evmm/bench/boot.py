"""Row 1: launch -> the guest's init marker, and launch -> process exit after ``poweroff``.

Both VMMs are timed the same way, from the serial line: launch is the moment the benchmark starts the
process; the marker is the arrival of init's ready line (a quiet console, so it is nearly the first output).
evmm also reads its boot-timer register (init writes 123 to it just before the ready line): ``-v`` logs the
time from the first vCPU's start, so the difference is evmm's own start-up (Python, imports, building the VM).
``poweroff`` is typed as soon as the shell prompt appears; the exit is the moment the process is reaped.

Each run boots a second time with a verbose console (the same command line without ``quiet``): the kernel
then prints ~25 KB through the 16550A, several port-I/O exits per byte, which is where a VMM's exit path
shows.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side

MEMORY_MIB = 128
MARKER_LOG = re.compile(r"guest boot marker after ([0-9.]+) ms")


class BootError(Exception):
    pass


class BootRow:
    name = "boot"
    sides = (EVMM, QEMU)

    def metrics(self) -> list[MetricSpec]:
        return [
            MetricSpec("boot.ready", "boot", "launch → init marker (serial line)", "ms", "lower"),
            MetricSpec(
                "boot.register",
                "boot",
                "vCPU start → init marker (evmm boot-timer register)",
                "ms",
                "lower",
                note="QEMU has no boot-timer device",
            ),
            MetricSpec("boot.exit", "boot", "launch → exit, poweroff at the prompt", "ms", "lower"),
            MetricSpec("boot.poweroff", "boot", "poweroff typed → process exit", "ms", "lower"),
            MetricSpec(
                "boot.verbose", "boot", "launch → init marker, verbose console (no quiet)", "ms", "lower"
            ),
        ]

    def setup(self, ctx: Context) -> None:
        pass

    def teardown(self, ctx: Context) -> None:
        pass

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        spec = replace(ctx.spec(MEMORY_MIB), verbose=side.vmm == "evmm")
        with launch(side, spec, f"{side.name}-boot", watch) as vm:
            _, ready = vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)
            typed = time.monotonic()
            vm.sendline("poweroff")
            code, exited = vm.wait_exit(120)
            if code != 0:
                raise BootError(f"exit status {code} after poweroff\n{vm.tail()}")
            out = Measurement()
            out.values["boot.ready"] = (ready - vm.launched) * 1000
            out.values["boot.exit"] = (exited - vm.launched) * 1000
            out.values["boot.poweroff"] = (exited - typed) * 1000
            if side.vmm == "evmm":
                m = MARKER_LOG.search(vm.output())
                if m is None:
                    raise BootError("evmm -v did not log the boot-timer marker")
                out.values["boot.register"] = float(m.group(1))
        verbose = replace(
            spec, append=" ".join(w for w in spec.append.split() if w != "quiet"), verbose=False
        )
        with launch(side, verbose, f"{side.name}-boot-verbose", watch) as vm:
            _, ready = vm.wait_for(READY, ctx.boot_timeout)
            out.values["boot.verbose"] = (ready - vm.launched) * 1000
            vm.wait_for(PROMPT, 60)
            vm.sendline("poweroff")
            code, _ = vm.wait_exit(120)
            if code != 0:
                raise BootError(f"exit status {code} after poweroff (verbose boot)\n{vm.tail()}")
        return out
