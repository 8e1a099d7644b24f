"""Measure the system calls evmm's threads make under their filters, per filter: what the allow-lists are made
from (docs/security.md has the numbers).

    evmm testhost run --share OUT -- python -m evmm.confine.trace --out OUT/trace.txt -- \\
        python -m pytest -m linux tests/linux/...
    python -m evmm.confine.trace --report OUT/trace.txt

bpftrace counts every system call a filtered task enters (``curtask->seccomp.mode == 2``), keyed by process,
thread, thread name and the task's *innermost filter*, so each call is charged to the filter that sees it
first: a new I/O worker's start-up calls, made before its own filter goes on, count under the main
thread's filter it inherited.  (strace -f measures the same but stops the VMM twice per call, and a guest
under strace in the KVM test host does not boot within the tests' timeouts.)  Run it with ``EVMM_SECCOMP=log``
so that a call the lists lack is counted rather than fatal.

Roles, from each process's threads: the filter the process leader wears is ``main``; the one a thread named
``evmm-vcpuN`` wears is ``vcpu``; any other thread's own filter is ``io``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

from evmm.confine.syscalls import name as syscall_name
from evmm.record import record

# The numbers whose first checked argument is recorded (ioctl: the request; the others: args[0]).
_ARG_CALLS = {
    "ioctl": (16, 1),
    "socket": (41, 0),
    "socketpair": (53, 0),
    "clone": (56, 0),
    "prctl": (157, 0),
    "seccomp": (317, 0),
}

SNAPSHOT = "=== evmm-trace snapshot"
# The counts are printed every 20 s as well as at the end: a run cut short (a test host's timeout) still
# leaves its last snapshot.
SCRIPT = rf"""
interval:s:20 {{ printf("{SNAPSHOT}\n"); print(@calls); print(@args); }}
END {{ printf("{SNAPSHOT}\n"); }}
tracepoint:raw_syscalls:sys_enter /curtask->seccomp.mode == 2/ {{
  @calls[pid, tid, comm, (uint64)curtask->seccomp.filter, args->id] = count();
}}
""" + "".join(
    rf"""
tracepoint:raw_syscalls:sys_enter /curtask->seccomp.mode == 2 && args->id == {nr}/ {{
  @args[pid, tid, comm, (uint64)curtask->seccomp.filter, args->id, args->args[{i}] & 0xffffffff] = count();
}}
"""
    for nr, i in _ARG_CALLS.values()
)

_LINE = re.compile(r"^@(calls|args)\[(\d+), (\d+), (.*?), (-?\d+), (\d+)(?:, (\d+))?\]: (\d+)$")


@record(frozen=True)
class Count:
    pid: int
    tid: int
    comm: str
    filter: int
    nr: int
    arg: int | None
    n: int


def parse(text: str) -> list[Count]:
    """The counts of the last complete snapshot (or of the whole text when it has none)."""
    blocks = [b for b in text.split(SNAPSHOT) if "@calls[" in b]
    if blocks:
        text = blocks[-1]
    out = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            _kind, pid, tid, comm, filt, nr, arg, n = m.groups()
            out.append(Count(int(pid), int(tid), comm, int(filt), int(nr), int(arg) if arg else None, int(n)))
    return out


@record
class Summary:
    processes: int
    threads: dict[str, int]  # role -> threads seen wearing that role's filter
    calls: dict[str, collections.Counter[str]]  # role -> syscall name -> count
    args: dict[str, collections.Counter[str]]  # role -> "ioctl 0xae80" -> count


def roles(counts: list[Count]) -> dict[tuple[int, int], str]:
    """Each filter, by process and kernel address (an address is reused once its filter is freed), as a role."""
    out: dict[tuple[int, int], str] = {}
    for c in counts:
        if c.tid == c.pid:
            out[c.pid, c.filter] = "main"
    for c in counts:
        if (c.pid, c.filter) not in out:
            out[c.pid, c.filter] = "vcpu" if c.comm.startswith("evmm-vcpu") else "io"
    return out


def summarise(counts: list[Count]) -> Summary:
    role_of = roles(counts)
    calls: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    args: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    threads: dict[str, set[int]] = collections.defaultdict(set)
    for c in counts:
        role = role_of[c.pid, c.filter]
        if c.arg is None:
            calls[role][syscall_name(c.nr)] += c.n
            threads[role].add(c.tid)
        else:
            args[role][f"{syscall_name(c.nr)} {c.arg:#x}"] += c.n
    return Summary(
        len({c.pid for c in counts}), {r: len(t) for r, t in threads.items()}, dict(calls), dict(args)
    )


def report(s: Summary, names: dict[int, str] | None = None) -> str:
    names = names or {}
    out = [f"{s.processes} evmm processes; threads per filter: {dict(sorted(s.threads.items()))}"]
    for role in sorted(s.calls):
        c = s.calls[role]
        out.append(f"\n{role}: {len(c)} distinct system calls, {sum(c.values())} calls")
        out += [f"  {n:>10}  {call}" for call, n in c.most_common()]
        for what, n in s.args.get(role, collections.Counter()).most_common():
            call, _, value = what.partition(" ")
            label = names.get(int(value, 16), "") if call == "ioctl" else ""
            out.append(f"  {n:>10}    {what} {label}".rstrip())
    return "\n".join(out)


def observed(report_text: str) -> dict[str, set[str]]:
    """Read a ``report`` back: per role, the system calls and the ``ioctl 0x...`` requests it lists."""
    out: dict[str, set[str]] = {}
    role = None
    for line in report_text.splitlines():
        m = re.match(r"^(\w+): \d+ distinct system calls", line)
        if m:
            role = m.group(1)
            out[role] = set()
        elif role is not None and line.startswith("  "):
            words = line.split()
            if len(words) >= 2:
                out[role].add(" ".join(words[1:3]) if words[1] in _ARG_CALLS else words[1])
    return out


def ioctl_names() -> dict[int, str]:
    """Names for the ioctl requests evmm's lists know (for the report)."""
    import termios

    from evmm.confine import ioctls

    out: dict[int, str] = {}
    for module in (_kvm_lib(), _vhost_lib()):
        for attr in dir(module):
            if attr.startswith(("KVM_", "VHOST_")) and isinstance(getattr(module, attr), int):
                value = getattr(module, attr) & 0xFFFFFFFF
                if value > 0xFFFF:  # request numbers, not capability or flag constants
                    out.setdefault(value, attr)
    for attr in ("TCGETS", "TCSETS", "TCSETSW", "TCSETSF", "TIOCGWINSZ", "FIONBIO", "FIOCLEX", "FIONCLEX"):
        out[getattr(termios, attr)] = attr
    out.update({value: attr for attr, value in vars(ioctls).items() if attr.isupper()})
    return out


def _kvm_lib() -> object:
    from evmm.kvm._ffi import lib

    return lib


def _vhost_lib() -> object:
    from evmm.vhost._vhost_ffi import lib

    return lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evmm.confine.trace", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write bpftrace's counts here while running COMMAND")
    p.add_argument("--report", type=Path, help="summarise counts written by an earlier --out")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.report is not None:
        print(report(summarise(parse(args.report.read_text())), ioctl_names()))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.out is None or not command:
        p.error("give --out FILE -- COMMAND, or --report FILE")
    if not os.path.isdir("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"], check=False)
    env = dict(os.environ, EVMM_SECCOMP=os.environ.get("EVMM_SECCOMP", "log"))
    tracer = subprocess.Popen(["bpftrace", "-o", str(args.out), "-e", SCRIPT], env=env)
    try:
        import time

        time.sleep(5)  # bpftrace attaches its probes (no readiness signal in 0.17)
        rc = subprocess.call(command, env=env)
    finally:
        tracer.send_signal(2)  # SIGINT: bpftrace prints its maps and exits
        tracer.wait(60)
    print(report(summarise(parse(args.out.read_text())), ioctl_names()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
