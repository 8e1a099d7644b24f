"""evmm-oci's reading of config.json (evmm/oci/spec.py) and what it plans for the VM (evmm/oci/plan.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from evmm.errors import EvmmError
from evmm.oci import plan
from evmm.oci.spec import DEFAULT_MEMORY, KERNEL_OVERHEAD, MIN_MEMORY, SpecError, load, parse, parse_process

# What docker 20.10 hands its runtime for `docker run --memory 256m --cpus 1.5 busybox sh` (abridged: the
# capability lists, the seccomp profile and the masked paths are shorter than docker's, same fields).
DOCKER: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=abc"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"]},
        "oomScoreAdj": 0,
    },
    "root": {"path": "/var/lib/docker/overlay2/x/merged"},
    "hostname": "abc",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/HOSTS", "options": ["rbind", "rprivate"]},
    ],
    "hooks": {
        "prestart": [{"path": "/proc/42/exe", "args": ["libnetwork-setkey", "-exec-root=/run/d", "abc"]}]
    },
    "linux": {
        "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"},
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            "memory": {"limit": 268435456, "swap": 536870912},
            "cpu": {"shares": 0, "quota": 150000, "period": 100000},
            "blockIO": {},
        },
        "cgroupsPath": "/docker/abc",
        "namespaces": [{"type": t} for t in ("mount", "network", "uts", "pid", "ipc")],
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []},
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"],
    },
}


def docker() -> dict[str, Any]:
    return copy.deepcopy(DOCKER)


def test_docker_config_is_read() -> None:
    s = parse(docker(), Path("/b"))
    assert s.root == Path("/var/lib/docker/overlay2/x/merged") and s.hostname == "abc"
    assert s.process is not None and s.process.args == ("sh",) and s.process.env[1] == "HOSTNAME=abc"
    assert s.memory == 268435456 + KERNEL_OVERHEAD and s.vcpus == 2
    assert s.cgroups_path == "/docker/abc" and s.sysctl == (("net.ipv4.ip_unprivileged_port_start", "0"),)
    assert [h.args[0] for h in s.hooks_of("prestart")] == ["libnetwork-setkey"]
    assert set(s.confined) == {
        "process.capabilities",
        "linux.seccomp",
        "linux.maskedPaths",
        "linux.readonlyPaths",
        "linux.resources.devices",
    }


def test_every_unsupported_field_is_named_at_once() -> None:
    c = docker()
    c["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 1}]
    c["linux"]["namespaces"].append({"type": "user"})
    c["linux"]["intelRdt"] = {"closID": "x"}
    c["process"]["ioPriority"] = {"class": "IOPRIO_CLASS_IDLE"}
    c["hooks"]["createContainer"] = [{"path": "/bin/true"}]
    c["linux"]["resources"]["memory"]["disableOOMKiller"] = True
    c["domainname"] = "example.org"
    with pytest.raises(SpecError) as e:
        parse(c, Path("/b"))
    msg = str(e.value)
    for field in (
        "linux.uidMappings",
        "linux.namespaces[user]",
        "linux.intelRdt",
        "process.ioPriority",
        "hooks.createContainer",
        "linux.resources.memory.disableOOMKiller",
        "domainname",
    ):
        assert field in msg, field
    assert "\n" not in msg and msg.startswith("/b/config.json: ")


def test_empty_values_ask_for_nothing() -> None:
    c = docker()
    c["linux"]["uidMappings"] = []
    c["linux"]["intelRdt"] = None
    c["process"]["apparmorProfile"] = ""
    c["linux"]["resources"]["cpu"]["realtimeRuntime"] = 0
    assert parse(c, Path("/b")).vcpus == 2


def test_strict_refuses_the_confined_fields() -> None:
    c = docker()
    c["annotations"] = {"io.evmm.oci.strict": "true"}
    with pytest.raises(SpecError, match=r"not enforced inside a VM .*linux\.seccomp"):
        parse(c, Path("/b"))


def test_host_network_is_unsupported() -> None:
    c = docker()
    c["linux"]["namespaces"] = [{"type": "mount"}, {"type": "pid"}]
    with pytest.raises(SpecError, match="the host's network"):
        parse(c, Path("/b"))


def test_joining_another_containers_namespace_is_unsupported_but_a_netns_path_is_fine() -> None:
    c = docker()
    c["linux"]["namespaces"] = [
        {"type": "network", "path": "/run/netns/cni-1"},
        {"type": "ipc", "path": "/x"},
    ]
    with pytest.raises(SpecError, match=r"linux\.namespaces\[ipc\]\.path"):
        parse(c, Path("/b"))
    c["linux"]["namespaces"].pop()
    assert parse(c, Path("/b")).namespace("network").path == "/run/netns/cni-1"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "cpu, vcpus",
    [
        ({}, 1),
        ({"quota": 50000, "period": 100000}, 1),
        ({"quota": 200000, "period": 100000}, 2),
        ({"quota": 250000}, 3),
        ({"cpus": "0-3"}, 4),
        ({"cpus": "1,3"}, 2),
        ({"cpus": "0-3", "quota": 100000, "period": 100000}, 1),
    ],
)
def test_cpu_limits_size_the_vcpus(cpu: dict[str, Any], vcpus: int) -> None:
    c = docker()
    c["linux"]["resources"]["cpu"] = cpu
    assert parse(c, Path("/b")).vcpus == vcpus


def test_memory_limits_size_the_guest() -> None:
    c = docker()
    del c["linux"]["resources"]["memory"]
    assert parse(c, Path("/b")).memory == DEFAULT_MEMORY
    c["linux"]["resources"]["memory"] = {"limit": 4 << 20}
    assert parse(c, Path("/b")).memory == MIN_MEMORY
    c["linux"]["resources"]["memory"] = {"limit": (512 << 20) + 1}
    assert parse(c, Path("/b")).memory == (512 << 20) + KERNEL_OVERHEAD + (1 << 20)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda c: c.update(ociVersion="2.0"), "ociVersion"),
        (lambda c: c["process"].update(args=[]), "process.args is empty"),
        (lambda c: c["process"].update(cwd="rel"), "not absolute"),
        (lambda c: c["process"]["user"].update(uid=-1), "process.user.uid -1 is out of range"),
        (lambda c: c["process"]["user"].update(uid=True), "process.user.uid is not an integer"),
        (lambda c: c["linux"]["resources"]["cpu"].update(cpus="3-1"), "not a CPU list"),
        (lambda c: c["mounts"].append({"destination": "x"}), "not an absolute path"),
        (lambda c: c["linux"].update(sysctl={"../x": "1"}), "not a sysctl name"),
        (lambda c: c.update(root={}), "root.path is missing"),
    ],
)
def test_malformed_fields_are_named(mutate: Any, problem: str) -> None:
    c = docker()
    mutate(c)
    with pytest.raises(SpecError, match=problem.replace(".", r"\.")):
        parse(c, Path("/b"))


def test_load_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"config\.json: No such file"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(SpecError, match="not JSON"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(docker()))
    assert load(tmp_path).hostname == "abc"


def test_exec_process_file() -> None:
    p = parse_process({"args": ["ls"], "cwd": "/tmp", "user": {"uid": 5, "gid": 6}, "terminal": True}, "f")
    assert (p.args, p.cwd, p.uid, p.gid, p.terminal) == (("ls",), "/tmp", 5, 6, True)
    with pytest.raises(SpecError, match=r"f: .*process\.args"):
        parse_process({"args": "ls"}, "f")


# ---- the plan -------------------------------------------------------------------------------------------


def test_plan_shares_the_rootfs_and_bind_sources(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    c = docker()
    c["root"] = {"path": "rootfs", "readonly": True}
    c["mounts"] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(tmp_path / "vol"), "options": ["rbind", "rw"]},
        {"destination": "/etc/hosts", "source": str(tmp_path / "etc" / "hosts"), "options": ["bind", "ro"]},
        {
            "destination": "/etc/hostname",
            "type": "bind",
            "source": str(tmp_path / "etc" / "name"),
            "options": ["ro"],
        },
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
    ]
    (tmp_path / "etc" / "name").write_text("box\n")
    c["annotations"] = {"io.evmm.oci.append": "loglevel=7 foo"}
    s = parse(c, tmp_path)
    vm, mounts = plan.vm_plan(s)
    assert [(sh.tag, sh.path, sh.readonly) for sh in vm.shares] == [
        ("rootfs", tmp_path / "rootfs", True),
        ("m1", tmp_path / "vol", False),
        ("m2", tmp_path / "etc", True),
    ]
    assert mounts == [
        {"type": "proc", "source": "proc", "target": "/proc", "options": []},
        {"type": "bind", "source": "/run/evmm-oci/shares/m1", "target": "/data", "options": ["rbind", "rw"]},
        {
            "type": "bind",
            "source": "/run/evmm-oci/shares/m2/hosts",
            "target": "/etc/hosts",
            "options": ["rbind", "ro"],
        },
        {
            "type": "bind",
            "source": "/run/evmm-oci/shares/m2/name",
            "target": "/etc/hostname",
            "options": ["rbind", "ro"],
        },
        {"type": "cgroup2", "source": "cgroup", "target": "/sys/fs/cgroup", "options": ["ro"]},
    ]
    assert vm.append == ("loglevel=7", "foo") and vm.memory == s.memory and vm.vcpus == s.vcpus
    assert vm.guest_setup == (("sysctl", "-w", "net.ipv4.ip_unprivileged_port_start=0"),)
    first = plan.first_process(s, mounts, stdin=False)
    assert first.container is not None
    assert first.container["rootfs"] == "/run/evmm-oci/shares/rootfs" and first.container["readonly_root"]
    assert first.container["namespaces"] == ["mount", "uts", "pid", "ipc"]  # network: the VM's own
    assert first.argv == ("sh",) and not first.stdin and not first.join


def test_plan_refuses_what_a_vm_cannot_mount(tmp_path: Path) -> None:
    c = docker()
    c["mounts"] = [{"destination": "/x", "type": "nfs", "source": "server:/x"}]
    with pytest.raises(EvmmError, match="mount type 'nfs'"):
        plan.vm_plan(parse(c, tmp_path))
    c["mounts"] = [{"destination": "/x", "type": "bind", "source": str(tmp_path / "missing")}]
    with pytest.raises(EvmmError, match="does not exist"):
        plan.vm_plan(parse(c, tmp_path))
    c["mounts"] = []
    c["annotations"] = {"io.evmm.oci.kernel": str(tmp_path / "nope")}
    with pytest.raises(EvmmError, match=r"io\.evmm\.oci\.kernel=.*no such file"):
        plan.vm_plan(parse(c, tmp_path))
