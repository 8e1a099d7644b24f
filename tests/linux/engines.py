"""Container engines for evmm-oci's linux-tier tests: docker, podman and containerd, each started by the test
(inside the KVM test host) with all its state in the test's own directory, evmm-oci registered as a runtime
next to runc, the test image imported, and everything torn down at the end.

- docker: ``dockerd --add-runtime evmm=EVMM_OCI`` (what ``"runtimes": {"evmm": {"path": ...}}`` in
  daemon.json does), ``docker run --runtime evmm``;
- podman: no daemon; ``podman --runtime PATH``;
- containerd: ``containerd --config``; ``ctr run --runtime io.containerd.runc.v2 --runc-binary PATH``.

``EVMM_OCI`` is a small script that runs this checkout's ``python -m evmm.oci``: the engines exec a path.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from evmm.assets.initramfs import Archive, read_cpio
from evmm.oci.image import busybox_rootfs, oci_archive, podman_options, rootfs_tar, runtime_script

IMAGE = "evmm.local/busybox:latest"
DOCKER = "/usr/bin/docker"  # Debian's client (a newer one elsewhere on PATH would do too)
START_TIMEOUT = 180.0  # dockerd's first start in the TCG test host takes 10-30 s
RUN_TIMEOUT = 600.0


class EngineError(AssertionError):
    pass


def evmm_oci_missing() -> str | None:
    """Why evmm-oci cannot run containers here (its guest side is missing), or None."""
    if importlib.util.find_spec("evmm.sandbox") is None:
        return "evmm-oci's guest side needs the guest agent's host API (evmm.sandbox, issue 14)"
    return None


def agent_initramfs(where: Path) -> Path | None:
    """None when the default guest's initramfs starts evmm-agent; otherwise one that does, made here: the
    default one with an archive appended (the kernel unpacks them in order) holding the agent and an inittab
    that respawns it (until the default guest has the agent itself, issue 14)."""
    from evmm.agent import GUEST_PATH, build
    from evmm.assets import default_guest

    base = default_guest().initramfs.read_bytes()
    if any(e.path == GUEST_PATH.lstrip("/") for e in read_cpio(gzip.decompress(base))):
        return None
    extra = Archive()
    extra.file(GUEST_PATH.lstrip("/"), build().read_bytes(), 0o755)
    extra.file("etc/inittab", AGENT_INITTAB)
    out = where / "initramfs-agent.cpio.gz"
    out.write_bytes(base + extra.to_gzip())
    return out


# No console shell (its end would power the VM off): the agent, respawned, is what the VM runs.
AGENT_INITTAB = (
    b"::sysinit:/sbin/acpid -l /dev/null\n::respawn:/sbin/evmm-agent\n::ctrlaltdel:/sbin/poweroff\n"
)


def missing() -> str | None:
    """Why the engines cannot run here, or None."""
    if os.geteuid() != 0:
        return "container engines need root"
    for tool, package in (
        ("dockerd", "docker.io"),
        ("podman", "podman"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian's {package})"
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "no cgroup v2 at /sys/fs/cgroup"
    return None


def run(
    argv: Sequence[str], *, timeout: float = RUN_TIMEOUT, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise EngineError(f"{' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r  # type: ignore[no-any-return]


class Image:
    """The test image's root filesystem and its two archive forms, built once per test directory."""

    def __init__(self, where: Path) -> None:
        self.rootfs = busybox_rootfs(where / "rootfs")
        self.tar = where / "rootfs.tar"
        self.tar.write_bytes(rootfs_tar(self.rootfs))
        self.oci = where / "image-oci.tar"
        self.oci.write_bytes(oci_archive(self.tar.read_bytes(), IMAGE))


class Daemon:
    """A daemon process of a test, killed (its process group) when the test ends."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                list(argv), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _wait_for(what: str, ready: object, daemon: Daemon, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise EngineError(f"{what} exited ({daemon.proc.returncode}):\n{daemon.tail()}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise EngineError(f"{what} not ready within {timeout:g} s:\n{daemon.tail()}")


def _containerd(where: Path) -> Daemon:
    """containerd with its state under ``where`` and its socket ``where/containerd.sock``, once it answers."""
    where.mkdir(parents=True, exist_ok=True)
    sock = where / "containerd.sock"
    config = where / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{where / "root"}"\nstate = "{where / "state"}"\n'
        # The CRI plugin wants a network setup of its own; ctr and dockerd need none of it.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
    )
    daemon = Daemon(["containerd", "--config", str(config)], where / "containerd.log")
    _wait_for(
        "containerd",
        lambda: run(["ctr", "--address", str(sock), "version"], check=False).returncode == 0,
        daemon,
    )
    return daemon


class Docker:
    name = "docker"

    def __init__(self, where: Path, runtime: Path, image: Image) -> None:
        self.where = where
        self.sock = where / "docker.sock"
        # A containerd of our own for dockerd (--containerd): the one dockerd would start must be up within
        # dockerd's fixed timeout, which a busy TCG test host can miss ("timeout waiting for containerd").
        self.containerd = _containerd(where / "containerd")
        self.daemon = Daemon(
            [
                "dockerd",
                *("--data-root", str(where / "data"), "--exec-root", str(where / "exec")),
                *("--pidfile", str(where / "dockerd.pid"), "-H", f"unix://{self.sock}"),
                *("--containerd", str(where / "containerd" / "containerd.sock")),
                *("--add-runtime", f"evmm={runtime}"),
            ],
            where / "dockerd.log",
        )
        _wait_for("dockerd", lambda: self.cli("version", check=False).returncode == 0, self.daemon)
        self.cli("import", str(image.tar), IMAGE)

    def cli(
        self, *args: str, check: bool = True, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, "-H", f"unix://{self.sock}", *args], check=check, timeout=timeout)

    def run_argv(self, runtime: str, *args: str) -> list[str]:
        """``docker run`` with the runtime ``runc`` or ``evmm``; ``args`` are run's options, image and command."""
        return [DOCKER, "-H", f"unix://{self.sock}", "run", "--runtime", runtime, *args]

    def close(self) -> None:
        self.cli("rm", "-f", *self.cli("ps", "-aq", check=False).stdout.split(), check=False)
        self.daemon.stop()
        self.containerd.stop()


class Podman:
    name = "podman"

    def __init__(self, where: Path, runtime: Path, image: Image) -> None:
        self.where = where
        self.runtime = runtime
        self.base = ["podman", *podman_options(where)]
        self.cli("import", str(image.tar), IMAGE)

    def cli(
        self, *args: str, check: bool = True, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], check=check, timeout=timeout)

    def run_argv(self, runtime: str, *args: str) -> list[str]:
        path = "runc" if runtime == "runc" else str(self.runtime)
        return [*self.base, "--runtime", path, "run", *args]

    def close(self) -> None:
        self.cli("rm", "-af", check=False)


class Containerd:
    name = "containerd"

    def __init__(self, where: Path, runtime: Path, image: Image) -> None:
        self.where = where
        self.runtime = runtime
        self.sock = where / "containerd.sock"
        self.daemon = _containerd(where)
        self.cli("images", "import", str(image.oci))

    def cli(
        self, *args: str, check: bool = True, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["ctr", "--address", str(self.sock), "-n", "evmm-test", *args], check=check, timeout=timeout
        )

    def run_argv(self, runtime: str, *args: str) -> list[str]:
        """``ctr run`` through containerd's runc shim, with runc or evmm-oci as its runc binary; ``args``
        end with the image, a container id and the command."""
        binary = ["--runc-binary", str(self.runtime)] if runtime != "runc" else []
        return [
            *("ctr", "--address", str(self.sock), "-n", "evmm-test", "run"),
            *("--runtime", "io.containerd.runc.v2", *binary, *args),
        ]

    def close(self) -> None:
        for cid in self.cli("containers", "ls", "-q", check=False).stdout.split():
            self.cli("tasks", "kill", "-s", "KILL", cid, check=False)
            self.cli("containers", "rm", cid, check=False)
        self.daemon.stop()


Engine = Docker | Podman | Containerd
ENGINES: dict[str, type[Docker] | type[Podman] | type[Containerd]] = {
    "docker": Docker,
    "podman": Podman,
    "containerd": Containerd,
}


@contextlib.contextmanager
def engine(name: str) -> Iterator[Engine]:
    """The engine ``name`` running with its state in a directory of its own; stopped, with its containers,
    and the directory gone at the end.  The directory's path is short: dockerd's containerd puts sockets
    under it, and a Unix socket's path has at most 107 bytes."""
    where = Path(tempfile.mkdtemp(prefix=f"eo-{name[:2]}-", dir="/tmp"))
    try:
        image = Image(where)
        initrd = agent_initramfs(where) if evmm_oci_missing() is None else None
        runtime = runtime_script(where, ["--initrd", str(initrd)] if initrd else [])
        (where / name).mkdir()
        eng = ENGINES[name](where / name, runtime, image)
        try:
            yield eng
        finally:
            eng.close()
    finally:
        subprocess.run(["umount", "-R", "-l", str(where)], capture_output=True, check=False)
        shutil.rmtree(where, ignore_errors=True)
