"""Where evmm's time goes: py-spy attached to an extra, uncounted evmm run of a row, and its samples summarised.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;...;frame COUNT``, outermost
first, each frame ``function (file:line)``.  ``summarise`` is pure: the functions with the most samples on top
of the stack (self) and anywhere in it (total), and per thread kind (a stack's outermost evmm frame says which:
a vCPU thread, the reactor, an I/O worker).  Only samples of running threads are recorded (py-spy leaves
idle ones out), so the shares are of evmm's CPU time, not of wall time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import field
from pathlib import Path

from evmm.bench.console import VmProcess
from evmm.record import record

RATE = 50  # samples per second: low, since every sample stops the process under nested emulation
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@record
class Summary:
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    total_time: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    imports: Counter[str] = field(default_factory=Counter)  # samples importing X (first level below evmm)

    def table(self, top: int = 15) -> str:
        if not self.samples:
            return "no samples\n"
        lines = [f"{self.samples} samples of running threads"]
        lines.append("by thread:")
        for name, n in self.threads.most_common():
            lines.append(f"  {100 * n / self.samples:5.1f}%  {name}")
        if self.imports:
            lines.append("importing (the first module below the importer; its own imports included):")
            for name, n in self.imports.most_common(top):
                lines.append(f"  {100 * n / self.samples:5.1f}%  {name}")
        lines.append("self (on top of the stack):")
        for name, n in self.self_time.most_common(top):
            lines.append(f"  {100 * n / self.samples:5.1f}%  {name}")
        lines.append("total (anywhere in the stack):")
        for name, n in self.total_time.most_common(top):
            lines.append(f"  {100 * n / self.samples:5.1f}%  {name}")
        return "\n".join(lines) + "\n"

    def to_json(self, top: int = 15) -> dict[str, object]:
        def share(c: Counter[str]) -> list[tuple[str, float]]:
            return [(k, round(100 * v / max(1, self.samples), 1)) for k, v in c.most_common(top)]

        return {
            "samples": self.samples,
            "threads": share(self.threads),
            "self": share(self.self_time),
            "total": share(self.total_time),
            "imports": share(self.imports),
        }


def frame_name(frame: str) -> str:
    """``function (path/to/evmm/x/y.py:12)`` -> ``function (evmm/x/y.py)``: per function, not per line."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m.group("file")
    for anchor in ("/evmm/", "/site-packages/", "/lib/python3"):
        i = path.find(anchor)
        if i >= 0:
            path = path[i + 1 :]
            break
    return f"{m.group('func')} ({path})"


_STARTUP = ("_find_and_load", "build_parser", "config_from_args", "build_microvm", "build_standard")


def thread_kind(thread: str, frames: list[str]) -> str:
    """What a stack's thread does, from its name (py-spy's ``thread (TID): NAME`` frame) and frames."""
    text = ";".join(frames)
    if thread.startswith("vcpu") or "vcpu_thread" in text:
        return "vCPU threads (in KVM_RUN, or handing an exit to the reactor)"
    if "-io" in thread or "blk/backend.py" in text:
        return "virtio-blk I/O workers"
    if any(f"{name} (" in text for name in _STARTUP) or "run_machine" not in text:
        return "start-up (imports, building the VM)"
    # The main thread after start-up runs uvloop, whose own loop is native code: py-spy shows its samples
    # in run_machine, and those of Python callbacks (devices, control, console) below it.
    return "reactor (uvloop: devices, control, console)"


# Frames every stack of a kind shares, left out of the "total" list (they would top it and say nothing).
_PLUMBING = ("<frozen ", "runpy", "threading.py")


def _first_import(names: list[str]) -> str | None:
    """The module whose import (directly from evmm's code) this stack is in, or None."""
    for i, name in enumerate(names):
        if name.startswith("_find_and_load "):
            for later in names[i + 1 :]:
                if later.startswith("<module> ("):
                    return later[len("<module> (") : -1]
            return None
    return None


def summarise(raw: str) -> Summary:
    out = Summary()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        thread = ""
        if parts and parts[0].startswith("thread ("):
            thread = parts[0].split(": ", 1)[1] if ": " in parts[0] else ""
        frames = [f for f in parts if f and not f.startswith(("process ", "thread ("))]
        if not frames:
            continue
        out.samples += n
        names = [frame_name(f) for f in frames]
        out.self_time[names[-1]] += n
        for name in set(names):
            if not any(p in name for p in _PLUMBING):
                out.total_time[name] += n
        out.threads[thread_kind(thread, frames)] += n
        module = _first_import(names)
        if module is not None:
            out.imports[module] += n
    return out


def _wait_for_python(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe")):
                return
        except OSError:
            return
        time.sleep(0.01)


class Profiler:
    """Attaches py-spy to each evmm process it is shown; ``finish`` waits for the recordings."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    @staticmethod
    def available() -> str | None:
        """None when py-spy is there, else why not."""
        return None if shutil.which("py-spy") else "py-spy is not installed (pip install py-spy)"

    def attach(self, vm: VmProcess) -> None:
        _wait_for_python(vm.pid)  # under `ip netns exec` the process is not Python yet
        path = self.out.with_suffix(f".{len(self.procs)}.raw") if self.procs else self.out
        argv = ["py-spy", "record", "--pid", str(vm.pid), "--format", "raw", "--output", str(path)]
        argv += ["--rate", str(RATE), "--nonblocking", "--threads"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append((proc, path))

    def finish(self, timeout: float = 60.0) -> tuple[Summary, list[str]]:
        """The recordings merged, and py-spy's complaints."""
        raw: list[str] = []
        errors: list[str] = []
        for proc, path in self.procs:
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if path.is_file():
                raw.append(path.read_text())
            else:
                errors.append(
                    err.decode(errors="replace").strip()[-300:] or f"py-spy exited {proc.returncode}"
                )
        return summarise("\n".join(raw)), errors
