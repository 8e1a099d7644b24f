#!/usr/bin/env python3
"""Stream TCP through evmm's virtio-net until the guest's NIC breaks, then show both ends (not a test).

Written for issue 4's net bug: under sustained streams the guest's driver found a used ring it could not
believe ("virtio_net virtio0: output.0:id N is not a head!"), marked the queue broken and, on TX, spun in
start_xmit for good (this script's vCPU samples found it there).  The cause was evmm's used-index store
passing through 0 (struct.pack_into zeroes first; see evmm/devices/virtio/queue.py), fixed in a4c2d81.
This boots the tools guest (iperf3 inside) with a tap in a network namespace of its own, runs timed iperf3
streams both ways, and when one hangs or fails prints the guest's dmesg tail, `query-vm` (every virtqueue's
indices on both sides), where the vCPUs are (symbolized with the guest's own kallsyms) and the host's TCP
state.  Needs root and a KVM that boots Linux; on this machine run it in the test host:

    evmm testhost run --cpus 1 -- python3 scripts/net_soak.py [--rounds N] [--vmm qemu] [--cpus N] [--vhost]

``--vmm qemu`` runs QEMU microvm instead (`evmm bench`'s command line), the comparison that says whether a
failure is evmm's.  Exit status: 0 if every stream finished, 1 at the first hang or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evmm.assets import default_guest
from evmm.bench import iperf
from evmm.bench.console import PROMPT, READY, VmProcess
from evmm.bench.runner import kernel_cmdline
from evmm.bench.vmm import VmSpec, evmm_argv, qemu_argv
from evmm.control.client import Client
from evmm.errors import EvmmError
from evmm.netns import ip

NETNS = "evmm-soak"
TAP = "soak0"
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"
STREAM_SECONDS = 15
SYMBOLS_PORT = 7777
HANG = 60.0  # a 15 s stream (plus 3 s warm-up) that has not finished by then has hung


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def guest_says(vm: VmProcess, command: str) -> str:
    try:
        return vm.check(command, 60)
    except Exception as e:  # the guest may be what hung
        return f"(the guest did not answer: {type(e).__name__})"


def kernel_symbols(vm: VmProcess) -> tuple[list[int], list[str]]:
    """The running guest's text symbols (KASLR moves them every boot), sent from /proc/kallsyms over the
    network while it still works: Debian's System.map is a placeholder, its vmlinux has no symbol table."""
    out = Path(tempfile.mkdtemp(prefix="evmm-soak-")) / "kallsyms"
    listener = subprocess.Popen(
        ["ip", "netns", "exec", NETNS, "socat", "-u", f"TCP-LISTEN:{SYMBOLS_PORT},reuseaddr", f"CREATE:{out}"]
    )
    try:
        time.sleep(0.5)
        vm.check(f"grep -i ' t ' /proc/kallsyms | socat -u - TCP:{HOST_IP}:{SYMBOLS_PORT}", 120)
        listener.wait(30)
    except Exception as e:  # symbols are a nicety: the soak goes on without them
        print(f"(no guest symbols: {type(e).__name__})")
        listener.kill()
        return [], []
    pairs = sorted(
        (int(a, 16), name) for a, _, name in (line.split()[:3] for line in out.read_text().splitlines())
    )
    return [a for a, _ in pairs], [n for _, n in pairs]


async def where_vcpus(c: Client, symbols: tuple[list[int], list[str]], samples: int = 16) -> str:
    """Pause the VM a few times and say where each vCPU was (RIP against the guest's kallsyms)."""
    addrs, names = symbols
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(samples):
        await c.call("pause")
        vcpus = (await c.call("query-vm"))["vcpus"]
        await c.call("resume")
        for v in vcpus:
            rip = (v["registers"] or {}).get("rip")
            if rip is None:
                continue
            i = bisect.bisect_right(addrs, rip) - 1
            where = f"{names[i]}+{rip - addrs[i]:#x}" if i >= 0 and rip - addrs[i] < 0x10000 else f"{rip:#x}"
            seen[f"vcpu{v['index']} {where}"] += 1
        await asyncio.sleep(0.2)
    return "\n".join(f"{n:3d} {w}" for w, n in seen.most_common()) or "(no vCPU registers in query-vm)"


async def evmm_state(sock: Path, symbols: tuple[list[int], list[str]]) -> str:
    """evmm's virtio devices (query-vm) and where the vCPUs are, over one control connection."""
    try:
        async with asyncio.timeout(600), Client(sock) as c:
            devices = (await c.call("query-vm"))["devices"]
            state = json.dumps([d for d in devices if "virtio" in d], indent=1)
            return f"{state}\nwhere the vCPUs are (16 samples):\n{await where_vcpus(c, symbols)}"
    except (EvmmError, TimeoutError) as e:  # a pause that fails says something too
        return f"(evmm's control socket: {type(e).__name__}: {e})"


def report(vm: VmProcess, which: str, sock: Path, symbols: tuple[list[int], list[str]]) -> None:
    """What both ends look like once a stream has failed."""
    print("guest dmesg:\n" + guest_says(vm, "dmesg | tail -n 12"))
    if which == "evmm":
        print("evmm's virtio devices (query-vm):\n" + asyncio.run(evmm_state(sock, symbols)))
    print("host TCP:\n" + sh("ip", "netns", "exec", NETNS, "ss", "-tino"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds of one stream each way (20)")
    ap.add_argument("--vmm", choices=("evmm", "qemu"), default="evmm")
    ap.add_argument("--cpus", type=int, default=1, help="the guest's vCPUs (1)")
    ap.add_argument("--vhost", action="store_true", help="the kernel's vhost-net moves the frames")
    args = ap.parse_args()
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    ip("netns", "add", NETNS)
    try:
        return soak(args.vmm, args.rounds, args.cpus, args.vhost)
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)


def soak(which: str, rounds: int, cpus: int, vhost: bool) -> int:
    ip("-n", NETNS, "link", "set", "lo", "up")
    guest = default_guest()
    sock = Path(tempfile.mkdtemp(prefix="evmm-soak-")) / "api.sock"
    spec = VmSpec(
        guest.vmlinux, guest.tools_initramfs, kernel_cmdline(), 512, cpus=cpus, tap=TAP, api_sock=sock
    )
    argv = evmm_argv(spec, vhost=vhost) if which == "evmm" else qemu_argv(spec, vhost=vhost)
    vm = VmProcess(["ip", "netns", "exec", NETNS, *argv], which)
    try:
        vm.wait_for(READY, 300)
        vm.wait_for(PROMPT, 60)
        ip("-n", NETNS, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ip("-n", NETNS, "link", "set", TAP, "up")
        nic = next(n for n in vm.check("ls /sys/class/net", 30).split() if n != "lo")
        vm.check(
            f"ip addr add {GUEST_IP}/24 dev {nic} && ip link set {nic} up && iperf3 -s -D -p {iperf.PORT}", 30
        )
        vm.check(f"ping -c 1 -W 10 {HOST_IP} >/dev/null", 60)
        symbols = kernel_symbols(vm) if which == "evmm" else ([], [])
        for i in range(rounds):
            for reverse in (True, False):
                name = "guest -> host" if reverse else "host -> guest"
                client = iperf.client_argv(GUEST_IP, STREAM_SECONDS, 3, guest_sends=reverse)
                p = subprocess.Popen(
                    ["ip", "netns", "exec", NETNS, *client],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                try:
                    out, _ = p.communicate(timeout=HANG)
                    rate = f"{iperf.parse(out).bits_per_second / 1e6:.1f} Mbit/s"
                except subprocess.TimeoutExpired:
                    failure = "hung"
                    p.kill()
                    p.communicate()
                except iperf.IperfError as e:
                    failure = f"failed: {e}"  # e.g. the guest's end went away mid-test
                else:
                    print(f"round {i + 1}: {name} {rate}", flush=True)
                    continue
                print(f"round {i + 1}: {name} {failure}", flush=True)
                report(vm, which, sock, symbols)
                return 1
        print(f"{which} (vhost={'on' if vhost else 'off'}): {2 * rounds} streams, none failed")
        vm.sendline("poweroff")
        vm.wait_exit(120)
        return 0
    finally:
        if vm.alive():
            vm.kill()


if __name__ == "__main__":
    sys.exit(main())
