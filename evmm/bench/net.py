"""Row 4: virtio-net, iperf3 TCP guest -> host and host -> guest over a tap, in a network namespace of our own.

The benchmark makes the namespace, starts each VMM inside it (``ip netns exec``) with a tap it creates, and
plays the host there: 10.0.2.1 on the tap, the guest 10.0.2.15.  The guest runs ``iperf3 -s``; the host runs
the client for a fixed time (``-t``, the first seconds left out as warm-up), forward for host -> guest and
``-R`` for guest -> host.  Each VMM
runs twice per round: vhost-net off (its device model in the VMM) and on (the kernel moves the packets).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import replace

from evmm.bench import iperf
from evmm.bench.console import PROMPT, READY, VmProcess
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, EVMM_VHOST, QEMU, QEMU_VHOST, Side
from evmm.netns import ip

MEMORY_MIB = 512
HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
STREAM_SECONDS = 15
STREAM_OMIT = 3
QUICK_STREAM_SECONDS = 4
QUICK_STREAM_OMIT = 1
STREAM_SLACK = 120.0  # connecting, warm-up, and the final exchange over the control connection


class NetError(Exception):
    pass


class NetRow:
    name = "net"
    sides = (EVMM, QEMU, EVMM_VHOST, QEMU_VHOST)

    def __init__(self) -> None:
        self.ns = f"evmm-bench-{os.getpid()}"
        self.made = False
        self.taps = itertools.count()
        self.seconds, self.omit = STREAM_SECONDS, STREAM_OMIT

    def metrics(self) -> list[MetricSpec]:
        out = []
        for evmm, side, suffix in ((EVMM, QEMU, "vhost=off"), (EVMM_VHOST, QEMU_VHOST, "vhost=on")):
            key = "" if side is QEMU else ".vhost"
            out += [
                MetricSpec(
                    f"net.g2h{key}",
                    "net",
                    f"virtio-net TCP guest → host ({suffix})",
                    "Gbit/s",
                    "higher",
                    qemu_side=side.name,
                    evmm_side=evmm.name,
                ),
                MetricSpec(
                    f"net.h2g{key}",
                    "net",
                    f"virtio-net TCP host → guest ({suffix})",
                    "Gbit/s",
                    "higher",
                    qemu_side=side.name,
                    evmm_side=evmm.name,
                ),
            ]
        return out

    def setup(self, ctx: Context) -> None:
        if os.geteuid() != 0:
            raise NetError("needs root, to make a network namespace and taps")
        if not os.path.exists("/dev/net/tun"):
            raise NetError("/dev/net/tun is missing (the tun module is not loaded)")
        if shutil.which("iperf3") is None:
            raise NetError("iperf3 is not installed on this host (apt-get install iperf3): it is the client")
        if ctx.quick:
            self.seconds, self.omit = QUICK_STREAM_SECONDS, QUICK_STREAM_OMIT
        ip("netns", "add", self.ns)
        self.made = True
        ip("-n", self.ns, "link", "set", "lo", "up")

    def teardown(self, ctx: Context) -> None:
        if self.made:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
            self.made = False

    def _client(self, guest_sends: bool) -> iperf.IperfResult:
        argv = [
            "ip",
            "netns",
            "exec",
            self.ns,
            *iperf.client_argv(GUEST_IP, self.seconds, self.omit, guest_sends=guest_sends),
        ]
        limit = self.seconds + self.omit + STREAM_SLACK
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            raise NetError(f"iperf3 did not finish within {limit:g} s") from None
        if not r.stdout.strip():
            raise NetError(f"iperf3 exited {r.returncode} with no report: {r.stderr.strip()[:300]}")
        return iperf.parse(r.stdout)

    @staticmethod
    def _guest_view(vm: VmProcess) -> str:
        """What the guest's kernel says about a stream that failed (failures.log keeps it, not the table)."""
        try:
            out = vm.check("dmesg | tail -n 15; grep -i virtio /proc/interrupts", 30)
        except Exception as e:  # the guest may be what failed
            return f"\n(the guest did not answer: {type(e).__name__})"
        return "\nguest dmesg tail and interrupts:\n" + out.rstrip()

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        tap = f"bt{next(self.taps)}"  # a fresh name each run: the last one may still be going away
        spec = replace(ctx.spec(MEMORY_MIB, tools=True), tap=tap)
        prefix = ["ip", "netns", "exec", self.ns]
        key = ".vhost" if side.vhost else ""
        out = Measurement()
        with launch(side, spec, f"{side.name}-net", watch, prefix) as vm:
            vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)
            ip("-n", self.ns, "addr", "add", f"{HOST_IP}/24", "dev", tap)
            ip("-n", self.ns, "link", "set", tap, "up")
            nic = [n for n in vm.check("ls /sys/class/net", 30).split() if n != "lo"]
            if len(nic) != 1:
                raise NetError(f"the guest has NICs {nic}, not one")
            vm.check(f"ip addr add {GUEST_IP}/24 dev {nic[0]} && ip link set {nic[0]} up", 30)
            vm.check(f"iperf3 -s -D -p {iperf.PORT}", 30)
            vm.check(f"ping -c 1 -W 10 {HOST_IP} >/dev/null", 60)
            for direction, guest_sends in (("g2h", True), ("h2g", False)):
                try:
                    result = self._client(guest_sends)
                except (NetError, iperf.IperfError) as e:
                    raise NetError(f"{direction}: {e}{self._guest_view(vm)}") from None
                # The same test on both VMMs: iperf3's own account of what it ran, not only what we asked.
                ran = (result.duration, result.omit, result.reverse)
                if ran != (self.seconds, self.omit, guest_sends):
                    raise NetError(f"{direction}: iperf3 ran (-t, -O, -R) = {ran}, not the test asked for")
                if result.received_bytes <= 0:
                    raise NetError(f"{direction}: no data arrived in {self.seconds} s")
                k = f"net.{direction}{key}"
                out.values[k] = result.gbit_s
                out.work[k] = self.seconds  # the work is the timed test; the bytes it moved are the result
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
