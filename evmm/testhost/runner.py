"""Run one command inside the KVM test host and return its exit status.

The host side of the protocol in ``init``: a private results directory (9p tag ``results``) carries the command
in and its exit status out; ttyS0 is the command's terminal, streamed here; ttyS1 is L1's kernel console, kept
in ``console.log`` and shown only when something fails.  QEMU runs in its own process group with
``PR_SET_PDEATHSIG``, and every exit path (timeout, error, SIGINT, SIGTERM, SIGHUP) kills that group.
"""

from __future__ import annotations

import ctypes
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from types import FrameType

from evmm.bytecode import precompile
from evmm.errors import EvmmError
from evmm.record import record

EXIT_TIMEOUT = 124  # the test host or the command timed out (as timeout(1) reports it)
EXIT_NO_STATUS = 125  # the test host failed before the command's exit status came back

QEMU = "qemu-system-x86_64"
# TCG emulating AMD SVM with nested paging: the fastest and cleanest CPU model measured (``-cpu max`` works
# too, but its L2 guests warn of an XSAVE size mismatch and one died).
CPU = "qemu64,+svm,+npt,+vgif"
# highres=off nohz=off: a periodic tick.  Under a guest busy with exits, L1 on QEMU TCG's SVM sometimes went idle
# for good (a one-shot timer interrupt lost, it seems: nothing re-arms it) or panicked ("corrupted stack end
# detected inside scheduler"): 2 of 5 stress runs (4 QEMU + 3 evmm verbose boots each) lost L1 before, 0 of 3
# with these.  A periodic LAPIC timer keeps firing after a lost interrupt.
KERNEL_ARGS = "console=ttyS1 quiet panic=-1 reboot=t kvm_amd.npt=1 kvm_amd.nested=0 highres=off nohz=off"
INSIDE_RESULTS = "/run/evmm-testhost"  # where the chroot sees the results share
# Host paths that the test host hides behind its own mounts: a --share under them is mounted over those.
HIDDEN = (Path("/tmp"), Path("/run"), Path("/dev"), Path("/proc"), Path("/sys"))
FORWARDED = ("PATH", "HOME", "TERM", "LANG", "LC_ALL", "USER", "LOGNAME")
FORWARDED_PREFIXES = ("EVMM_", "PYTHON")

_PR_SET_PDEATHSIG = 1


@record(frozen=True)
class Share:
    path: Path  # absolute; mounted at the same path inside
    writable: bool = True


@record
class RunConfig:
    command: Sequence[str]
    kernel: Path
    initramfs: Path
    cwd: Path = field(default_factory=Path.cwd)
    shares: Sequence[Share] = ()
    # Paths the command needs to read (the evmm cache, say): shared read-only where the test host hides them.
    visible: Sequence[Path] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    memory_mib: int = 2048
    cpus: int = 2
    timeout: float = 1800.0  # the command, from the moment it starts
    boot_timeout: float = 120.0  # QEMU start -> the command starts
    shutdown_timeout: float = 60.0  # the command exits -> QEMU exits
    interactive: bool = False
    qemu: str = QEMU


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the caller's environment the command sees, plus ``EVMM_IN_TESTHOST=1``."""
    env = {k: v for k, v in environ.items() if k in FORWARDED or k.startswith(FORWARDED_PREFIXES)}
    env["EVMM_IN_TESTHOST"] = "1"
    return env


def _covered(path: Path, shares: Sequence[Share]) -> bool:
    return any(path.is_relative_to(s.path) for s in shares)


def visible_shares(shares: Sequence[Share], must_see: Sequence[Path]) -> list[Share]:
    """``shares`` plus read-only shares of each ``must_see`` path the test host would otherwise hide.

    The working directory and evmm's own source tree must be visible inside; under /tmp (a tmpfs inside)
    they would not be, so they are shared read-only unless a --share already covers them.
    """
    result = list(shares)
    for p in must_see:
        if any(p.is_relative_to(h) for h in HIDDEN) and not _covered(p, result):
            result.append(Share(p, writable=False))
    return result


def command_script(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The shell script that runs ``command`` in the chroot of the host root."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    where = shlex.quote(str(cwd))
    return (
        f"export {exports}\n"
        f"cd {where} || {{ echo 'testhost: cannot enter {cwd} inside the test host (share it with --share)' >&2;"
        f" exit {EXIT_NO_STATUS}; }}\n"
        f"exec {shlex.join(command)}\n"
    )


def qemu_argv(
    config: RunConfig, results: Path, shares: Sequence[Share], monitor: Path | None = None
) -> list[str]:
    argv = [
        config.qemu,
        *("-accel", "tcg,thread=multi", "-cpu", CPU, "-M", "q35"),
        *("-smp", str(config.cpus), "-m", f"{config.memory_mib}M"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-kernel", str(config.kernel), "-initrd", str(config.initramfs), "-append", KERNEL_ARGS),
        *("-chardev", "stdio,id=cmd,signal=off", "-serial", "chardev:cmd"),  # ttyS0: the command
        *("-serial", f"file:{results / 'console.log'}"),  # ttyS1: L1's kernel console
        *("-device", "virtio-rng-pci"),
        *("-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"),
        *("-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap"),
    ]
    for i, share in enumerate(shares):
        ro = "" if share.writable else ",readonly=on"
        argv += ["-virtfs", f"local,path={share.path},mount_tag=s{i},security_model=none,multidevs=remap{ro}"]
    if monitor is not None:
        argv += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    return argv


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MONITOR_PROMPT = b"(qemu) "
# What L1's vCPUs were doing when it went silent: each one's registers (RIP, CR3, HLT: halted for good, or
# spinning where) and QEMU's view of them.  Asked before the test host is killed for a stall or a timeout.
WHERE_ARE_THE_VCPUS = ("info cpus", "info registers -a")


def monitor_query(path: Path, commands: Sequence[str], timeout: float = 5.0) -> str:
    """Each of ``commands`` sent to a QEMU human monitor on the Unix socket ``path``; their output.

    Errors come back as text: this only ever feeds a failure report.
    """

    def until_prompt(sock: socket.socket) -> bytes:
        data = b""
        while not data.endswith(MONITOR_PROMPT):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the monitor closed the connection")
            data += chunk
        return data[: -len(MONITOR_PROMPT)]

    out = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            until_prompt(sock)  # the greeting
            for command in commands:
                sock.sendall(command.encode() + b"\n")
                text = _ANSI.sub("", until_prompt(sock).decode(errors="replace")).replace("\r", "")
                # The first line is the monitor's echo of the command, typed back character by character.
                lines = [ln for ln in text.split("\n")[1:] if ln.strip()]
                out.append(f"(qemu) {command}\n" + "\n".join(lines))
    except OSError as e:
        out.append(f"(the QEMU monitor at {path} did not answer: {e})")
    return "\n".join(out)


# Loaded before any fork: the child of a threaded parent must not dlopen (a lock held at fork would deadlock).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    # In the child, before exec: the kernel SIGKILLs QEMU if the process that started it dies, whatever way.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``_Terminated`` so that the ``finally`` that kills QEMU runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise _Terminated(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _raw_terminal(fd: int, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        view = view[n:]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class _Run:
    def __init__(
        self, config: RunConfig, results: Path, out_fd: int, err_fd: int, monitor: Path | None = None
    ) -> None:
        self.config = config
        self.results = results
        self.monitor = monitor
        self.vcpus = ""  # where L1's vCPUs were before a kill (record_vcpus)
        self.out_fd = out_fd
        self.err_fd = err_fd
        # Reported once the terminal is out of raw mode, where a plain newline is a line break again.
        self.messages: list[str] = []
        self.failed = False

    def say(self, message: str) -> None:
        self.messages.append(f"testhost: {message}\n")

    def report(self) -> None:
        for m in self.messages:
            _write_all(self.err_fd, m.encode())
        if self.failed:
            self.show_console()

    def show_console(self) -> None:
        """L1's kernel console and QEMU's own messages, for a failure report."""
        for name, title in (("console.log", "test host console"), ("qemu.err", "QEMU")):
            try:
                text = (self.results / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                lines = text.splitlines()[-60:]
                body = "".join(f"  {ln}\n" for ln in lines)
                _write_all(self.err_fd, f"--- {title} (last {len(lines)} lines) ---\n{body}".encode())
        if self.vcpus:
            body = "".join(f"  {ln}\n" for ln in self.vcpus.splitlines())
            _write_all(self.err_fd, f"--- test host vCPUs before it was killed ---\n{body}".encode())

    def record_vcpus(self) -> None:
        """Before killing a test host that stopped answering: where its vCPUs are, for the report."""
        if self.monitor is not None:
            self.vcpus = monitor_query(self.monitor, WHERE_ARE_THE_VCPUS)

    def exit_status(self) -> int | None:
        try:
            return int((self.results / "rc").read_text().strip())
        except (OSError, ValueError):
            return None

    def pump(self, proc: subprocess.Popen[bytes], stdin_fd: int | None) -> int:
        """Stream output until QEMU exits; enforce the boot, command and shutdown deadlines."""
        assert proc.stdout is not None and proc.stdin is not None
        c = self.config
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        if stdin_fd is not None:
            sel.register(stdin_fd, selectors.EVENT_READ, "in")
        phase, limit = "boot", c.boot_timeout
        deadline = time.monotonic() + limit
        status: int | None = None
        while True:
            for key, _ in sel.select(timeout=0.2):
                if key.data == "out":
                    data = os.read(proc.stdout.fileno(), 65536)
                    if not data:
                        sel.unregister(proc.stdout)
                        continue
                    _write_all(self.out_fd, data)
                else:
                    data = os.read(stdin_fd, 4096) if stdin_fd is not None else b""
                    if not data:
                        sel.unregister(key.fileobj)
                        continue
                    try:
                        proc.stdin.write(data)
                        proc.stdin.flush()
                    except BrokenPipeError:
                        sel.unregister(key.fileobj)
            if phase == "boot" and (self.results / "started").exists():
                phase, limit = "command", c.timeout
                deadline = time.monotonic() + limit
            if phase == "command" and (status := self.exit_status()) is not None:
                phase, limit = "shutdown", c.shutdown_timeout
                deadline = time.monotonic() + limit
            if proc.poll() is not None:
                # QEMU is gone; what it wrote is still in the pipe.  Drain it without waiting on the selector.
                while data := os.read(proc.stdout.fileno(), 65536):
                    _write_all(self.out_fd, data)
                break
            if time.monotonic() > deadline:
                self.record_vcpus()
                _kill_group(proc)
                what = {"boot": "boot", "command": "the command", "shutdown": "shutdown"}[phase]
                self.say(f"{what} timed out after {limit:g} s; killed the test host")
                if phase == "shutdown" and status is not None:
                    return status
                self.failed = True
                return EXIT_TIMEOUT
        status = self.exit_status()
        if status is None:
            self.say(
                f"the test host stopped (QEMU exit status {proc.returncode}) before the command's status came back"
            )
            self.failed = True
            return EXIT_NO_STATUS
        return status


def run(config: RunConfig, out_fd: int = 1, err_fd: int = 2, stdin_fd: int = 0) -> int:
    """Boot the test host, run ``config.command`` in it, and return the command's exit status.

    Returns ``EXIT_TIMEOUT`` when a deadline passed and ``EXIT_NO_STATUS`` when the test host failed first;
    both are reported on ``err_fd`` with L1's console log.
    """
    qemu = shutil.which(config.qemu)
    if qemu is None:
        raise EvmmError(f"{config.qemu} not found: install Debian's qemu-system-x86 package")
    for p in (config.kernel, config.initramfs):
        if not p.is_file():
            raise EvmmError(f"test host image {p} is missing: run `evmm assets`")
    precompile()  # what runs inside would otherwise compile evmm from source at every start, under TCG
    results = Path(tempfile.mkdtemp(prefix="evmm-testhost-"))
    # Not in ``results``, which the test host sees over 9p.
    private = Path(tempfile.mkdtemp(prefix="evmm-testhost-monitor-"))
    proc: subprocess.Popen[bytes] | None = None
    runner = _Run(config, results, out_fd, err_fd, private / "monitor.sock")
    try:
        shares = visible_shares(
            config.shares, [config.cwd, Path(__file__).resolve().parents[2], *config.visible]
        )
        (results / "cmd.sh").write_text(command_script(config.command, config.cwd, config.env))
        (results / "shares").write_text(
            "".join(f"s{i} {'rw' if s.writable else 'ro'} {s.path}\n" for i, s in enumerate(shares))
        )
        if config.interactive:
            size = os.get_terminal_size(stdin_fd)
            (results / "tty").write_text(f"{size.lines} {size.columns}\n")
        with _signals_raise(), open(results / "qemu.err", "wb") as qemu_err:
            proc = subprocess.Popen(
                qemu_argv(config, results, shares, runner.monitor),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=qemu_err,
                start_new_session=True,  # its own process group, out of reach of the terminal's signals
                preexec_fn=_die_with_parent,
            )
            with _raw_terminal(stdin_fd, config.interactive):
                return runner.pump(proc, stdin_fd if config.interactive else None)
    except _Terminated as e:
        runner.say(f"killed the test host on signal {e.signum}")
        runner.failed = True  # stopped from outside (a caller's timeout): its console says what it was doing
        runner.record_vcpus()
        return 128 + e.signum
    except KeyboardInterrupt:
        runner.say("killed the test host on Ctrl-C")
        raise
    finally:
        if proc is not None:
            _kill_group(proc)
        runner.report()
        shutil.rmtree(results, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
