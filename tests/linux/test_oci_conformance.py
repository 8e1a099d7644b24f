"""The runc conformance pass (issue 16): one small suite of bundles, each run with ``runc run`` and with
``evmm-oci run``, and the same observable results expected of both: exit status, stdout, stderr, and the
files the container left in its rootfs or a bind-mounted directory.

The expectations are written down once per scenario; the runc runs prove they are runc's behaviour, the
evmm-oci runs that evmm-oci has the same.  The bundles are built from the busybox test image.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.oci.image import busybox_rootfs, runtime_script
from evmm.oci.plan import INITRD_ANNOTATION
from evmm.record import record
from tests.linux.engines import agent_initramfs, evmm_oci_missing

TIMEOUT = 600.0

# What `runc spec` writes, trimmed to what the scenarios need (no capabilities, seccomp or masked paths:
# the confined fields would only be named in evmm-oci's log).
BASE: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
    },
    "root": {"path": "rootfs"},
    "hostname": "runc",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ],
    "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
}  # fmt: skip


@record(frozen=True)
class Scenario:
    name: str
    args: tuple[str, ...]
    exit: int = 0
    stdout: str = ""
    stderr: str = ""
    stdin: bytes = b""
    change: Callable[[dict[str, Any], Path], None] | None = None  # edits config.json; gets the scratch dir
    files: tuple[tuple[str, str], ...] = ()  # (path under the scratch dir, content) after the run


def _env(c: dict[str, Any], _d: Path) -> None:
    c["process"]["env"].append("FOO=bar baz")
    c["process"]["cwd"] = "/tmp"
    c["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [1002]}


def _readonly(c: dict[str, Any], _d: Path) -> None:
    c["root"]["readonly"] = True


def _volume(c: dict[str, Any], d: Path) -> None:
    (d / "vol").mkdir()
    (d / "ro").mkdir()
    c["mounts"] += [
        {"destination": "/data", "type": "bind", "source": str(d / "vol"), "options": ["rbind", "rw"]},
        {"destination": "/ro", "type": "bind", "source": str(d / "ro"), "options": ["rbind", "ro"]},
    ]


def _umask(c: dict[str, Any], _d: Path) -> None:
    c["process"]["user"]["umask"] = 0o027


def _rlimit(c: dict[str, Any], _d: Path) -> None:
    c["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 200, "soft": 123}]


def _tmpfs(c: dict[str, Any], _d: Path) -> None:
    c["mounts"].append(
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}
    )


SCENARIOS = (
    Scenario("exit-code", ("sh", "-c", "exit 3"), exit=3),
    Scenario(
        "streams", ("sh", "-c", "echo out; echo err >&2; echo out2"), stdout="out\nout2\n", stderr="err\n"
    ),
    # pid 1 of a pid namespace gets no signal it has no handler for from inside, not even SIGKILL
    # (pid_namespaces(7)); other processes die of theirs.
    Scenario("pid-1-signals", ("sh", "-c", "kill -KILL $$; echo alive"), stdout="alive\n"),
    Scenario(
        "signal-death",
        ("sh", "-c", 'sh -c "kill -TERM \\$\\$"; echo $?'),
        stdout="143\n",
        stderr="Terminated\n",
    ),
    Scenario("pid-1", ("sh", "-c", "echo $$"), stdout="1\n"),
    Scenario("hostname", ("hostname",), stdout="runc\n"),
    Scenario(
        "process-fields",
        ("sh", "-c", 'echo "$FOO"; pwd; id -u; id -g; id -G'),
        stdout="bar baz\n/tmp\n1000\n1001\n1001 1002\n",
        change=_env,
    ),
    Scenario("umask", ("sh", "-c", "umask"), stdout="0027\n", change=_umask),
    Scenario("rlimit", ("sh", "-c", "ulimit -n; ulimit -Hn"), stdout="123\n200\n", change=_rlimit),
    Scenario("stdin", ("sh", "-c", "tr a-z A-Z"), stdin=b"hello\n", stdout="HELLO\n"),
    Scenario(
        "rootfs-write",
        ("sh", "-c", "echo data > /written; cat /written"),
        stdout="data\n",
        files=(("bundle/rootfs/written", "data\n"),),
    ),
    Scenario(
        "readonly-root",
        ("sh", "-c", "touch /x || exit 9"),
        exit=9,
        stderr="touch: /x: Read-only file system\n",
        change=_readonly,
    ),
    Scenario(
        "volumes",
        ("sh", "-c", "echo v > /data/f; touch /ro/f || echo refused"),
        stdout="refused\n",
        stderr="touch: /ro/f: Read-only file system\n",
        change=_volume,
        files=(("vol/f", "v\n"),),
    ),
    Scenario("tmpfs", ("sh", "-c", "echo t > /scratch/t && cat /scratch/t"), stdout="t\n", change=_tmpfs),
)


@pytest.fixture(scope="module")
def bundle_annotations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The bundles' annotations: the agent's initramfs where the default guest has no agent yet."""
    initrd = agent_initramfs(tmp_path_factory.mktemp("initrd"))
    return {INITRD_ANNOTATION: str(initrd)} if initrd is not None else {}


# The evmm-oci scenarios of the default run: the process's fields, and the rootfs and volumes on the host.
DEFAULT = ("process-fields", "volumes")


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="eo-conf-"))
    try:
        yield busybox_rootfs(where / "rootfs")
    finally:
        shutil.rmtree(where, ignore_errors=True)


def cases() -> list[Any]:
    """Every scenario with runc (seconds each) and with evmm-oci (a VM boot each: about 3 minutes in a busy
    TCG test host).  The default run takes the evmm-oci side of ``DEFAULT`` only; -m engines takes all."""
    out = []
    for s in SCENARIOS:
        out.append(pytest.param("runc", s, id=f"{s.name}-runc", marks=pytest.mark.cost(10)))
        marks = [pytest.mark.cost(200)] + ([] if s.name in DEFAULT else [pytest.mark.engines])
        out.append(pytest.param("evmm-oci", s, id=f"{s.name}-evmm-oci", marks=marks))
    return out


@pytest.mark.parametrize(("runtime", "scenario"), cases())
def test_same_results_as_runc(
    runtime: str, scenario: Scenario, rootfs: Path, tmp_path: Path, bundle_annotations: dict[str, str]
) -> None:
    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.skip("needs root and runc")
    if runtime == "evmm-oci" and (why := evmm_oci_missing()):
        pytest.skip(why)
    bundle = tmp_path / "bundle"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    config = copy.deepcopy(BASE)
    config["process"]["args"] = list(scenario.args)
    if scenario.change is not None:
        scenario.change(config, tmp_path)
    if runtime == "evmm-oci":
        config["annotations"] = bundle_annotations
    (bundle / "config.json").write_text(json.dumps(config))
    binary = "runc" if runtime == "runc" else str(runtime_script(tmp_path))
    r = subprocess.run(
        [binary, "--root", str(tmp_path / "state"), "run", "--bundle", str(bundle), f"c-{scenario.name}"],
        input=scenario.stdin,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    observed = (r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))
    assert observed == (scenario.exit, scenario.stdout, scenario.stderr)
    for rel, content in scenario.files:
        assert (tmp_path / rel).read_text() == content, rel
    subprocess.run([binary, "--root", str(tmp_path / "state"), "delete", "--force", f"c-{scenario.name}"],
                   capture_output=True, check=False)  # fmt: skip
