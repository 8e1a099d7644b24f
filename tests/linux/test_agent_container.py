"""The agent's container exec options in a real guest (what evmm-oci builds on): a tiny rootfs (busybox copied
into a directory), its first process in new mount/uts/ipc/pid/net namespaces with proc, tmpfs and a
read-only bind mount inside, a read-only root and a hostname; a second process joining it as ``runc exec``
does; and signals to its pid 1 with pid-1 semantics (the kernel ignores a signal pid 1 has no handler for,
except SIGKILL, as it does under runc and crun).
"""

from __future__ import annotations

import asyncio

import pytest

from evmm.sandbox import Container, Mount, Process, Sandbox, User
from tests.linux.test_agent import linux_sandbox

pytestmark = pytest.mark.asyncio
ROOTFS = "/tmp/ctr"
APPLETS = "sh ls cat echo ps mount hostname sleep id touch stty ip grep wc"


async def make_rootfs(box: Sandbox) -> None:
    script = (
        f"mkdir -p {ROOTFS}/bin {ROOTFS}/proc {ROOTFS}/tmp {ROOTFS}/data /tmp/hostdata && "
        f"cp /bin/busybox {ROOTFS}/bin/ && for a in {APPLETS}; do ln -s busybox {ROOTFS}/bin/$a; done && "
        "echo from-the-guest > /tmp/hostdata/file"
    )
    r = await box.run(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr


def container(**kw: object) -> Container:
    return Container(
        ROOTFS,
        mounts=(
            Mount("/proc", "proc", "proc", ("nosuid", "nodev", "noexec")),
            Mount("/tmp", "tmpfs", "tmpfs", ("nosuid", "nodev"), "mode=1777"),
            Mount("/data", None, "/tmp/hostdata", ("bind", "ro")),
        ),
        namespaces=("mount", "uts", "ipc", "pid", "net"),
        **kw,  # type: ignore[arg-type]
    )


async def lines_until(p: Process, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await asyncio.wait_for(p.stdout.read_chunk(), 60)
        assert chunk is not None, seen
        seen += chunk
    return seen


async def test_a_container_and_a_process_joining_it(request: pytest.FixtureRequest) -> None:
    async with linux_sandbox(request.node, "agent-container") as box:
        await make_rootfs(box)
        script = (
            "trap 'echo got-term; exit 7' TERM; echo pid=$$; hostname; ls /; cat /data/file; "
            "touch /x 2>/dev/null || echo root-ro; touch /tmp/y && echo tmp-rw; "
            "touch /data/z 2>/dev/null || echo data-ro; ip -o link | wc -l; echo ready; "
            "while :; do sleep 0.1; done"
        )
        init = await box.exec(["sh", "-c", script], container=container(hostname="box", readonly_root=True))
        seen = (await lines_until(init, b"ready\n")).decode()
        assert "pid=1\n" in seen and "box\n" in seen, seen
        assert "bin\ndata\nproc\ntmp\n" in seen, seen  # nothing of the guest's root but the mounts
        assert (
            "from-the-guest\n" in seen and "root-ro\n" in seen and "tmp-rw\n" in seen and "data-ro\n" in seen
        )
        assert "\n1\nready" in seen  # a new network namespace: only lo

        # runc exec: the same namespaces and root, as another user, with a terminal.
        joined = await box.exec(
            ["sh", "-c", "hostname; id -u; ps -o pid,args; stty size"],
            join=init.pid,
            user=User(1000, 1000),
            tty=True,
            rows=33,
            cols=77,
        )
        out = (await joined.stdout.read()).decode().replace("\r\n", "\n")
        assert (await joined.wait()).code == 0, out
        assert out.startswith("box\n1000\n") and "33 77\n" in out, out
        assert "    1 sh -c trap" in out or " 1 sh -c trap" in out, out  # the container's pid 1 as its pid 1

        # The guest's view is untouched.
        r = await box.run(["sh", "-c", "hostname; ls /tmp/ctr/tmp"])
        assert r.stdout == b"evmm\n"

        await init.signal("TERM")  # pid 1 has a handler for it: it is delivered
        assert (await init.wait()).code == 7
        assert (await init.stdout.read()).endswith(b"got-term\n")


async def test_pid_1_without_a_handler_ignores_term_but_not_kill(request: pytest.FixtureRequest) -> None:
    async with linux_sandbox(request.node, "agent-pid1") as box:
        await make_rootfs(box)
        init = await box.exec(["sleep", "1000"], container=container())
        await asyncio.sleep(1)
        await init.signal("TERM")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(init.wait(), 3)  # pid-1 semantics: SIG_DFL TERM is not delivered
        await init.signal("KILL")
        assert (await asyncio.wait_for(init.wait(), 30)).signal == 9
        r = await box.run(["sh", "-c", "grep -c ' /tmp/ctr' /proc/mounts"])
        assert r.stdout == b"0\n"  # the container's mounts went with its namespace
