"""Row 4: virtio-net, iperf3 TCP guest -> host and host -> guest over a tap, in a network namespace of our own.

The benchmark makes the namespace, starts each VMM inside it (``ip netns exec``) with a tap it creates, and
plays the host there: 10.0.2.1 on the tap, the guest 10.0.2.15.  The guest runs ``iperf3 -s``; the host runs
the client with a fixed byte count (``-n``), forward for host -> guest and ``-R`` for guest -> host.  QEMU runs
twice per round: vhost-net off (its device model in the VMM, as evmm's) and on (the kernel moves packets).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import replace

from evmm.bench import iperf
from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, QEMU_VHOST, Side
from evmm.netns import ip

MiB = 1 << 20
MEMORY_MIB = 512
HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
STREAM_MIB = 256
QUICK_STREAM_MIB = 32
STREAM_TIMEOUT = 900.0


class NetError(Exception):
    pass


class NetRow:
    name = "net"
    sides = (EVMM, QEMU, QEMU_VHOST)

    def __init__(self) -> None:
        self.ns = f"evmm-bench-{os.getpid()}"
        self.made = False
        self.taps = itertools.count()
        self.nbytes = STREAM_MIB * MiB

    def metrics(self) -> list[MetricSpec]:
        out = []
        for side, suffix in ((QEMU, "vhost=off"), (QEMU_VHOST, "vhost=on")):
            key = "" if side is QEMU else ".vhost"
            out += [
                MetricSpec(
                    f"net.g2h{key}",
                    "net",
                    f"virtio-net TCP guest → host (QEMU {suffix})",
                    "Gbit/s",
                    "higher",
                    qemu_side=side.name,
                ),
                MetricSpec(
                    f"net.h2g{key}",
                    "net",
                    f"virtio-net TCP host → guest (QEMU {suffix})",
                    "Gbit/s",
                    "higher",
                    qemu_side=side.name,
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
        self.nbytes = (QUICK_STREAM_MIB if ctx.quick else STREAM_MIB) * MiB
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
            *iperf.client_argv(GUEST_IP, self.nbytes, guest_sends=guest_sends),
        ]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=STREAM_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise NetError(f"iperf3 did not finish within {STREAM_TIMEOUT:g} s") from None
        if not r.stdout.strip():
            raise NetError(f"iperf3 exited {r.returncode} with no report: {r.stderr.strip()[:300]}")
        return iperf.parse(r.stdout)

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
                result = self._client(guest_sends)
                # The receiver's count can fall short of the sender's by what was in flight when iperf3
                # took its final numbers; the sender's must be the whole stream.
                if result.sent_bytes < self.nbytes:
                    raise NetError(f"{direction}: {result.sent_bytes} of {self.nbytes} bytes were sent")
                # An EVMM run fills both the vhost=off and the vhost=on rows' evmm column.
                keys = (
                    [f"net.{direction}", f"net.{direction}.vhost"]
                    if side is EVMM
                    else [f"net.{direction}{key}"]
                )
                for k in keys:
                    out.values[k] = result.gbit_s
                    # The work is the stream asked for: iperf3 -n may send up to a block (128 KiB) more.
                    out.work[k] = self.nbytes
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
