"""evmm-oci's pure parts besides config.json: the state store and its status rule, the runtime log, the
network's ``ip -j`` parsing and the commands it plans, cgroup paths, signal names."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from evmm.errors import EvmmError
from evmm.oci import cgroups, network
from evmm.oci.cli import build_parser, parse_signal
from evmm.oci.runlog import RuntimeLog
from evmm.oci.state import ContainerNotFound, Record, Store, oci_state, start_time, status


def record(cid: str = "c", **kw: object) -> Record:
    return Record(id=cid, bundle="/b", rootfs="/b/rootfs", created="2026-12-07T00:00:00Z", **kw)  # type: ignore[arg-type]


def test_store_round_trip_and_runc_errors(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    store.create(record(annotations={"a": "b"}))
    assert store.load("c").annotations == {"a": "b"} and store.ids() == ["c"]
    with pytest.raises(EvmmError, match="container with id exists: c"):
        store.create(record())
    store.update("c", status="created")
    assert store.load("c").status == "created"
    store.remove("c")
    with pytest.raises(ContainerNotFound, match='container "c" does not exist'):
        store.load("c")
    for bad in ("../x", "a/b", "", "..", "x y"):
        with pytest.raises(EvmmError, match="invalid id format"):
            store.dir(bad)


def test_status_follows_the_monitor(tmp_path: Path) -> None:
    me = os.getpid()
    mine = start_time(me)
    assert mine is not None
    assert status(record(status="running", monitor_pid=me, monitor_start=mine)) == "running"
    # the same pid with another start time: a reused pid, not our monitor
    assert status(record(status="running", monitor_pid=me, monitor_start=mine + 1)) == "stopped"
    child = subprocess.Popen(["true"])
    child.wait()
    assert status(record(status="paused", monitor_pid=child.pid, monitor_start=1)) == "stopped"
    st = oci_state(record(status="running", monitor_pid=child.pid, monitor_start=1, annotations={"k": "v"}))
    assert st["status"] == "stopped" and st["pid"] == 0 and st["annotations"] == {"k": "v"}
    assert set(st) >= {"ociVersion", "id", "status", "pid", "bundle"}


def test_unknown_fields_in_an_old_state_file_are_ignored(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create(record())
    data = json.loads((tmp_path / "c" / "state.json").read_text())
    data["from_a_future_version"] = 1
    (tmp_path / "c" / "state.json").write_text(json.dumps(data))
    assert store.load("c").id == "c"


def test_json_log_lines_as_engines_read_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = RuntimeLog(str(tmp_path / "log"), "json")
    log.debug("hidden")
    log.warning("careful")
    log.error("it broke")
    log.close()
    lines = [json.loads(ln) for ln in (tmp_path / "log").read_text().splitlines()]
    assert [(x["level"], x["msg"]) for x in lines] == [("warning", "careful"), ("error", "it broke")]
    assert all(x["time"].endswith("Z") for x in lines)
    assert capsys.readouterr().err == "it broke\n"
    text = RuntimeLog(None, "text").format("error", 'a "quoted" word')
    assert text.startswith('time="') and text.endswith('level=error msg="a \\"quoted\\" word"\n')


IP_ADDR = json.dumps(
    [
        {
            "ifname": "lo",
            "link_type": "loopback",
            "address": "00:00:00:00:00:00",
            "mtu": 65536,
            "addr_info": [],
        },
        {
            "ifname": "eth0",
            "link_type": "ether",
            "address": "e6:78:8c:1f:c7:75",
            "mtu": 1450,
            "addr_info": [
                {"family": "inet", "local": "10.88.0.5", "prefixlen": 16, "scope": "global"},
                {"family": "inet6", "local": "fd00::5", "prefixlen": 64, "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
            ],
        },
        {"ifname": network.TAP, "link_type": "ether", "address": "aa:bb:cc:dd:ee:ff", "addr_info": []},
    ]
)
IP_ROUTE = json.dumps(
    [
        {"dst": "default", "gateway": "10.88.0.1", "dev": "eth0", "flags": []},
        {"dst": "10.88.0.0/16", "dev": "eth0", "protocol": "kernel", "scope": "link", "prefsrc": "10.88.0.5"},
        {"dst": "192.168.5.0/24", "gateway": "10.88.0.7", "dev": "eth0"},
    ]
)


def test_the_veth_is_read_from_ip_json() -> None:
    [eth0] = network.parse_interfaces(IP_ADDR)
    assert eth0 == network.Interface("eth0", "e6:78:8c:1f:c7:75", 1450, ("10.88.0.5/16", "fd00::5/64"))
    routes = network.parse_routes(IP_ROUTE)
    assert [r.dst for r in routes] == [
        "default",
        "192.168.5.0/24",
    ]  # the kernel's link route: the guest's own
    assert network.guest_commands(eth0, routes) == [
        ["ip", "link", "set", "eth0", "mtu", "1450"],
        ["ip", "-4", "addr", "add", "10.88.0.5/16", "dev", "eth0"],
        ["ip", "-6", "addr", "add", "fd00::5/64", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "-4", "route", "add", "default", "via", "10.88.0.1", "dev", "eth0"],
        ["ip", "-4", "route", "add", "192.168.5.0/24", "via", "10.88.0.7", "dev", "eth0"],
    ]
    with pytest.raises(EvmmError, match="not JSON"):
        network.parse_interfaces("{oops")


def test_the_redirect_goes_both_ways() -> None:
    cmds = network.redirect_commands("eth0", "tap0")
    assert ["tc", "qdisc", "add", "dev", "eth0", "ingress"] in cmds
    assert ["tc", "qdisc", "add", "dev", "tap0", "ingress"] in cmds
    redirects = [(c[4], c[-1]) for c in cmds if "mirred" in c]
    assert redirects == [("eth0", "tap0"), ("tap0", "eth0")]


def test_cgroup_paths() -> None:
    root = Path("/sys/fs/cgroup")
    assert cgroups.expand_slice("machine-foo-bar.slice") == (
        "machine.slice/machine-foo.slice/machine-foo-bar.slice"
    )
    assert (
        cgroups.cgroup_dir("system.slice:docker:abc", True, "abc") == root / "system.slice/docker-abc.scope"
    )
    assert cgroups.cgroup_dir("/docker/abc", False, "abc") == root / "docker/abc"
    with pytest.raises(EvmmError, match="leaves the cgroup tree"):
        cgroups.cgroup_dir("/../../etc", False, "x")
    with pytest.raises(EvmmError, match="slice:prefix:name"):
        cgroups.cgroup_dir("/docker/abc", True, "abc")
    assert (
        cgroups.shares_to_weight(2),
        cgroups.shares_to_weight(1024),
        cgroups.shares_to_weight(262144),
    ) == (
        1,
        39,
        10000,
    )


def test_signals_as_runc_takes_them() -> None:
    assert parse_signal("9") == parse_signal("KILL") == parse_signal("SIGKILL") == parse_signal("kill") == 9
    with pytest.raises(EvmmError, match="unknown signal 'SIGNOPE'"):
        parse_signal("SIGNOPE")
    with pytest.raises(EvmmError):
        parse_signal("999")


def parse(line: str) -> argparse.Namespace:
    return build_parser().parse_args(shlex.split(line))


def test_the_command_line_as_go_runc_and_conmon_write_it() -> None:
    a = parse(
        "--root /run/x --log /l.json --log-format json --systemd-cgroup create --bundle /b --pid-file /p "
        "--console-socket /s --no-pivot --no-new-keyring id1"
    )
    assert (a.root, a.log, a.log_format, a.systemd_cgroup, a.command) == (
        "/run/x",
        "/l.json",
        "json",
        True,
        "create",
    )
    assert (a.bundle, a.pid_file, a.console_socket, a.no_pivot, a.id) == ("/b", "/p", "/s", True, "id1")
    a = parse("exec --process /p.json --detach --pid-file /e --console-socket /s id1")
    assert (a.process, a.detach, a.pid_file, a.id, a.command) == ("/p.json", True, "/e", "id1", [])
    a = parse("exec -e A=1 --cwd /tmp -t id1 sh -c x")
    assert (a.env, a.cwd, a.tty, a.command) == (["A=1"], "/tmp", True, ["sh", "-c", "x"])
    assert parse("kill --all id1 15").all
    assert parse("kill id1").signal == "SIGTERM"
    assert parse("delete --force id1").force
    assert parse("ps --format json id1").format == "json"


def test_doctor_finds_evmm_oci_in_each_engines_configuration() -> None:
    from evmm.oci import doctor

    assert doctor.docker_runtimes(
        '{"runtimes": {"evmm": {"path": "/usr/local/bin/evmm-oci"}, "x": {"path": "runc"}}}'
    ) == ["evmm"]
    assert doctor.docker_runtimes("not json") == [] and doctor.docker_runtimes("{}") == []
    assert doctor.podman_runtimes(
        '[engine.runtimes]\nevmm = ["/usr/bin/evmm-oci"]\nrunc = ["/usr/bin/runc"]\n'
    ) == ["evmm"]
    toml = (
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.evmm]\n'
        'runtime_type = "io.containerd.runc.v2"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.evmm.options]\n'
        'BinaryName = "/usr/local/bin/evmm-oci"\n'
    )
    assert doctor.containerd_runtimes(toml) == ["evmm"]
    assert doctor.containerd_runtimes("version = 2\n") == []
