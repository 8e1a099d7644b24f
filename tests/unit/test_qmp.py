"""QMP (evmm/control/qmp.py on the RPC core) driven by the independent ``qemu.qmp`` client from PyPI, against a
fake machine; plus the pure parts: the --qmp option, the JSON stream splitter, the device book, and the
ShutdownCause mapping.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from evmm.control import start_control
from evmm.control.commands import check_params
from evmm.control.qmp import QMP_WORDING, parse_qmp_spec, shutdown_events
from evmm.control.qmp_devices import ARGS, DeviceBook
from evmm.errors import ConfigError
from evmm.exitcodes import EXIT_GUEST_POWEROFF, EXIT_GUEST_RESET, EXIT_SIGTERM
from evmm.rpc import qmp_wire
from evmm.rpc import server as rpc_server
from evmm.rpc.qmp_wire import JsonError, JsonSplitter, QmpError, timestamp
from tests.fakes.machine import FakeMachine

# ---- the option -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "unix:/run/q.sock,server,nowait",
        "unix:/run/q.sock,nowait,server",
        "unix:/run/q.sock,server=on,wait=off",
    ],
)
def test_qmp_spec_accepts_qemu_and_stratovirt_syntax(text: str) -> None:
    assert parse_qmp_spec(text) == Path("/run/q.sock")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:127.0.0.1:4444,server,nowait", "only unix:PATH,server,nowait is supported"),
        ("/run/q.sock", "only unix:PATH"),
        ("unix:,server,nowait", "the socket path is empty"),
        ("unix:/q.sock", "add ,server"),
        ("unix:/q.sock,nowait", "add ,server"),
        ("unix:/q.sock,server", "add ,nowait"),
        ("unix:/q.sock,server,wait", "add ,nowait"),
        ("unix:/q.sock,server=off,nowait", "add ,server"),
        ("unix:/q.sock,server,nowait,server", "server given twice"),
        ("unix:/q.sock,server,nowait,telnet", "unknown option 'telnet'"),
        ("unix:/q.sock,server=yes,nowait", "unknown option 'server=yes'"),
    ],
)
def test_qmp_spec_is_strict(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_qmp_spec(text)
    assert str(info.value).startswith(f"--qmp {text!r}")


# ---- the wire ---------------------------------------------------------------------------------------------------


def test_splitter_finds_back_to_back_objects_in_any_pieces() -> None:
    stream = b'{"execute":"stop"}{"execute": "x", "arguments": {"s": "}{\\"]"}}\r\n  [1]'
    want = [b'{"execute":"stop"}', b'{"execute": "x", "arguments": {"s": "}{\\"]"}}', b"[1]"]
    assert JsonSplitter().feed(stream) == want
    s = JsonSplitter()
    got: list[Any] = []
    for b in stream:
        got += s.feed(bytes([b]))
    assert got == want


def test_splitter_reports_junk_once_per_run_and_carries_on() -> None:
    out = JsonSplitter().feed(b'hello world {"execute":"cont"}')
    assert out == [
        JsonError("JSON parse error: unexpected 'h'; QMP input is JSON objects"),
        JsonError("JSON parse error: unexpected 'w'; QMP input is JSON objects"),
        b'{"execute":"cont"}',
    ]


def test_splitter_gives_up_on_an_endless_object() -> None:
    s = JsonSplitter(max_size=100)
    assert s.feed(b'{"a": "' + b"x" * 50) == []
    (err,) = s.feed(b"x" * 60)
    assert isinstance(err, JsonError) and err.fatal
    assert s.feed(b'{"execute": "stop"}') == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_splitter_never_crashes_and_chunking_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = JsonSplitter(max_size=500).feed(data)
    s = JsonSplitter(max_size=500)
    pieces: list[Any] = []
    last = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        pieces += s.feed(data[last:cut])
        last = max(last, cut)
    assert pieces == whole
    for item in whole:
        if isinstance(item, bytes):
            qmp_wire.decode_message(item)  # a JsonError or a dict, never an exception


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=5),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(),
                lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=4), v, max_size=3),
                max_leaves=8,
            ),
            max_size=4,
        ),
        max_size=4,
    )
)
def test_splitter_returns_every_object_sent(objects: list[dict[str, Any]]) -> None:
    stream = b"".join(json.dumps(o).encode() for o in objects)
    out = JsonSplitter().feed(stream)
    assert [qmp_wire.decode_message(b) for b in out if isinstance(b, bytes)] == objects


def test_timestamps_and_shutdown_causes() -> None:
    assert timestamp(1700000000.25) == {"seconds": 1700000000, "microseconds": 250000}
    guest = {"guest": True, "reason": "guest-shutdown"}
    assert shutdown_events(EXIT_GUEST_POWEROFF, None) == [("SHUTDOWN", guest)]
    quit = {"guest": False, "reason": "host-qmp-quit"}
    assert shutdown_events(EXIT_GUEST_POWEROFF, ("quit", "QMP client 1")) == [("SHUTDOWN", quit)]
    reset = {"guest": True, "reason": "guest-reset"}
    assert shutdown_events(EXIT_GUEST_RESET, None) == [("RESET", reset), ("SHUTDOWN", reset)]
    assert shutdown_events(EXIT_SIGTERM, None) == [("SHUTDOWN", {"guest": False, "reason": "host-signal"})]
    assert shutdown_events(99, None) == [("SHUTDOWN", {"guest": False, "reason": "host-error"})]


# ---- the device book -------------------------------------------------------------------------------------------


def args(command: str, **given: Any) -> dict[str, Any]:
    """Arguments as QmpServer's dispatch hands them over: checked, every one present."""
    return check_params(
        command, ARGS[command], {k.replace("_", "-"): v for k, v in given.items()}, QMP_WORDING
    )


def test_the_book_ties_nodes_and_netdevs_to_devices_and_frees_the_right_one() -> None:
    book = DeviceBook()
    book.add_node(
        args("blockdev-add", node_name="x", driver="raw", file={"driver": "file", "filename": "/d.img"})
    )
    book.add_netdev(args("netdev_add", id="x", ifname="tap0"))  # a netdev may share a node's name
    disk = book.plan(args("device_add", driver="virtio-blk-device", id="disk", drive="x"))
    assert (disk.kind, disk.params) == ("blk", {"path": "/d.img", "readonly": False})
    slots = [
        {"id": "hp-blk0", "kind": "blk", "occupied": False},
        {"id": "hp-net0", "kind": "net", "occupied": False},
    ]
    assert book.free_slot(disk, slots) == "hp-blk0"
    book.attach("disk", "hp-blk0", disk)
    nic = book.plan(
        args("device_add", driver="virtio-net-mmio", id="nic", netdev="x", mac="52:54:00:00:00:02")
    )
    assert book.free_slot(nic, slots) == "hp-net0"
    book.attach("nic", "hp-net0", nic)
    with pytest.raises(QmpError, match="Node 'x' is busy: device disk uses it"):
        book.del_node(args("blockdev-del", node_name="x"))
    assert book.slot_of("disk") == "hp-blk0" and book.device_in("hp-net0") == "nic"
    book.detach("disk")
    book.del_node(args("blockdev-del", node_name="x"))  # free now
    with pytest.raises(QmpError, match="netdev 'x' is used by device nic"):  # still held by the NIC
        book.del_netdev(args("netdev_del", id="x"))
    with pytest.raises(QmpError) as info:
        book.slot_of("disk")
    assert info.value.cls == "DeviceNotFound"


def test_the_book_reports_blocks_under_their_qmp_names() -> None:
    book = DeviceBook()
    book.add_node(args("blockdev-add", node_name="n1", driver="file", filename="/a.img", read_only=True))
    book.attach(
        "disk1", "hp-blk1", book.plan(args("device_add", driver="virtio-blk-device", id="disk1", drive="n1"))
    )
    cold = [
        {
            "name": "virtio-blk@0xd0000000",
            "kind": "blk",
            "id": "root",
            "path": "/root.img",
            "readonly": False,
        },
        {"name": "com1", "base": 0x3F8},
    ]
    slots: list[dict[str, Any]] = [
        {"id": "hp-blk0", "kind": "blk", "backend": None},
        {"id": "hp-blk1", "kind": "blk", "backend": "/a.img"},
        {"id": "hp-net0", "kind": "net", "backend": "tap tap0"},
    ]
    blocks = book.query_block(cold, slots)
    assert [(b["qdev"], b.get("inserted", {}).get("file")) for b in blocks] == [
        ("root", "/root.img"),
        ("hp-blk0", None),
        ("disk1", "/a.img"),
    ]
    assert blocks[2]["inserted"]["node-name"] == "n1" and blocks[2]["inserted"]["ro"] is True


# ---- against qemu.qmp -----------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evmm-qmp-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def machine() -> FakeMachine:
    return FakeMachine(park_delay=0.01)


@pytest.fixture
async def qmp_path(sockdir: Path, machine: FakeMachine) -> AsyncIterator[Path]:
    path = sockdir / "qmp.sock"
    close = await start_control(machine, None, api_sock=None, qmp=f"unix:{path},server,nowait")
    yield path
    await close()
    assert not path.exists()


@pytest.fixture
async def qmp(qmp_path: Path) -> AsyncIterator[QMPClient]:
    client = QMPClient("evmm-test")
    await client.connect(str(qmp_path))  # reads the greeting and negotiates capabilities itself
    yield client
    await client.disconnect()


async def run(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """``execute``, typed loosely: QMP answers are JSON of any shape."""
    return await client.execute(cmd, args)


async def next_event(client: QMPClient, timeout: float = 2.0) -> dict[str, Any]:
    ev = await asyncio.wait_for(client.events.get(), timeout)
    return dict(ev)


async def test_greeting_version_commands_and_status(qmp: QMPClient, machine: FakeMachine) -> None:
    assert qmp.greeting is not None
    version: dict[str, Any] = dict(qmp.greeting.QMP.version)
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert str(version["package"]).startswith("evmm ")
    assert await run(qmp, "query-version") == version
    names = {c["name"] for c in await run(qmp, "query-commands")}
    assert {"stop", "cont", "quit", "system_reset", "system_powerdown", "device_add", "device_del"} <= names
    assert await run(qmp, "query-status") == {"status": "running", "singlestep": False, "running": True}


async def test_stop_and_cont_with_events(qmp: QMPClient, machine: FakeMachine) -> None:
    assert await run(qmp, "stop") == {}
    assert machine.paused
    ev = await next_event(qmp)
    assert ev["event"] == "STOP" and ev["data"] == {}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert (await run(qmp, "query-status"))["status"] == "paused"
    assert await run(qmp, "cont") == {}
    assert (await next_event(qmp))["event"] == "RESUME"
    assert not machine.paused


async def test_quit_emits_shutdown(qmp: QMPClient, machine: FakeMachine) -> None:
    assert await run(qmp, "quit") == {}
    assert machine.stop_request is not None
    assert machine.stop_request[0] == EXIT_GUEST_POWEROFF
    assert machine.stop_request[1].startswith("quit by QMP client 1")
    ev = await next_event(qmp)
    assert (ev["event"], ev["data"]) == ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})


async def test_system_reset_emits_reset_then_shutdown(qmp: QMPClient, machine: FakeMachine) -> None:
    await run(qmp, "system_reset")
    assert machine.stop_request is not None and machine.stop_request[0] == EXIT_GUEST_RESET
    assert [(await next_event(qmp))["event"] for _ in range(2)] == ["RESET", "SHUTDOWN"]


async def test_system_powerdown_presses_the_power_button(qmp: QMPClient, machine: FakeMachine) -> None:
    await run(qmp, "system_powerdown")
    assert machine.power_presses == 1
    machine.emit("shutdown", {"code": EXIT_GUEST_POWEROFF, "reason": "guest powered off"})
    ev = await next_event(qmp)
    assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}


async def test_hot_replace_through_blockdev_add_and_device_add(
    qmp: QMPClient, machine: FakeMachine, sockdir: Path
) -> None:
    image = sockdir / "d.img"
    image.write_bytes(bytes(1 << 16))
    empty = await run(qmp, "query-block")
    assert [b["qdev"] for b in empty] == ["hp-blk0", "hp-blk1"] and "inserted" not in empty[0]
    await run(
        qmp,
        "blockdev-add",
        {
            "node-name": "drive1",
            "driver": "raw",
            "file": {"driver": "file", "filename": str(image)},
            "read-only": True,
        },
    )
    await run(qmp, "device_add", {"driver": "virtio-blk-device", "id": "disk1", "drive": "drive1"})
    assert machine.slots["hp-blk0"]["backend"] == str(image)
    spec = machine.specs["hp-blk0"]
    assert spec.readonly  # type: ignore[union-attr]
    block = await run(qmp, "query-block")
    assert block[0]["qdev"] == "disk1"
    assert block[0]["inserted"]["file"] == str(image) and block[0]["inserted"]["ro"] is True
    assert block[0]["inserted"]["node-name"] == "drive1"
    # A second disk goes to the next free slot, from StratoVirt's flat form.
    await run(qmp, "blockdev-add", {"node-name": "drive2", "driver": "file", "filename": str(image)})
    await run(qmp, "device_add", {"driver": "virtio-blk-mmio", "id": "disk2", "drive": "drive2"})
    assert machine.slots["hp-blk1"]["occupied"]
    with pytest.raises(ExecuteError, match="Node 'drive1' is busy"):
        await run(qmp, "blockdev-del", {"node-name": "drive1"})
    await run(qmp, "device_del", {"id": "disk1"})
    ev = await next_event(qmp)
    assert (ev["event"], ev["data"]) == (
        "DEVICE_DELETED",
        {"device": "disk1", "path": "/machine/peripheral/disk1"},
    )
    assert not machine.slots["hp-blk0"]["occupied"]
    await run(qmp, "blockdev-del", {"node-name": "drive1"})


async def test_net_hot_replace(qmp: QMPClient, machine: FakeMachine) -> None:
    await run(qmp, "netdev_add", {"type": "tap", "id": "net0", "ifname": "tap5"})
    await run(
        qmp,
        "device_add",
        {"driver": "virtio-net-device", "id": "nic0", "netdev": "net0", "mac": "52:54:00:00:00:01"},
    )
    spec = machine.specs["hp-net0"]
    assert (spec.tap, spec.mac) == ("tap5", "52:54:00:00:00:01")  # type: ignore[union-attr]
    await run(qmp, "netdev_add", {"id": "net1", "ifname": "tap6"})
    with pytest.raises(ExecuteError, match="no free net hot-replace slot"):
        await run(qmp, "device_add", {"driver": "virtio-net-device", "id": "nic1", "netdev": "net1"})
    await run(qmp, "device_del", {"id": "nic0"})
    await run(qmp, "netdev_del", {"id": "net0"})


@pytest.mark.parametrize(
    ("cmd", "args", "cls", "desc"),
    [
        ("frobnicate", None, "CommandNotFound", "The command frobnicate has not been found"),
        ("qmp_capabilities", None, "CommandNotFound", "negotiation is already complete"),
        ("stop", {"now": True}, "GenericError", "Parameter 'now' is unexpected"),
        ("device_del", {"id": "nope"}, "DeviceNotFound", "Device 'nope' not found"),
        ("device_del", {}, "GenericError", "Parameter 'id' is missing"),
        ("device_del", {"id": 3}, "GenericError", "Invalid parameter type for 'id', expected: string"),
        ("device_del", {"id": None}, "GenericError", "Invalid parameter type for 'id', expected: string"),
        ("cont", {"id": None}, "GenericError", "Parameter 'id' is unexpected"),
        (
            "blockdev-add",
            {"node-name": "n", "filename": ""},
            "GenericError",
            "blockdev-add: filename must be 1 to 4096 characters",
        ),
        (
            "blockdev-add",
            {"node-name": "n", "file": {"driver": "file"}},
            "GenericError",
            "Parameter 'filename' is missing",
        ),
        ("device_add", {"driver": "e1000", "id": "x"}, "GenericError", "driver 'e1000' is not supported"),
        ("device_add", {"driver": "virtio-blk-device", "id": "x"}, "GenericError", "takes drive=NODE"),
        (
            "device_add",
            {"driver": "virtio-blk-device", "id": "x", "drive": "no"},
            "GenericError",
            "Drive 'no' not found",
        ),
        (
            "device_add",
            {"driver": "virtio-blk-device", "id": "x", "drive": "d", "addr": "0x1"},
            "GenericError",
            "'addr' is unexpected",
        ),
        ("blockdev-add", {"node-name": "n"}, "GenericError", "Parameter 'filename' is missing"),
        (
            "blockdev-add",
            {"node-name": "n", "driver": "qcow2", "filename": "/x"},
            "GenericError",
            "driver 'qcow2' is not supported",
        ),
        (
            "netdev_add",
            {"id": "n", "ifname": "t", "type": "user"},
            "GenericError",
            "type 'user' is not supported",
        ),
        ("blockdev-del", {"node-name": "zz"}, "GenericError", "Failed to find node"),
    ],
)
async def test_errors_are_qmp_errors(
    qmp: QMPClient, cmd: str, args: dict[str, Any] | None, cls: str, desc: str
) -> None:
    with pytest.raises(ExecuteError) as info:
        await run(qmp, cmd, args)
    assert info.value.error_class == cls
    assert desc in info.value.error.error.desc
    assert (await run(qmp, "query-status"))["running"]


async def test_core_errors_become_generic_errors(qmp: QMPClient, machine: FakeMachine, sockdir: Path) -> None:
    await run(qmp, "blockdev-add", {"node-name": "gone", "filename": str(sockdir / "missing.img")})
    with pytest.raises(ExecuteError, match=r"missing\.img: no such file") as info:
        await run(qmp, "device_add", {"driver": "virtio-blk-device", "id": "d", "drive": "gone"})
    assert info.value.error_class == "GenericError"
    machine.stop(EXIT_GUEST_POWEROFF, "powered off")
    await asyncio.sleep(0.01)
    with pytest.raises(ExecuteError, match="the VM is stopped"):
        await run(qmp, "cont")


# ---- raw bytes ----------------------------------------------------------------------------------------------------


async def raw_session(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    greeting = json.loads(await asyncio.wait_for(reader.readline(), 5))
    return reader, writer, greeting


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> dict[str, Any]:
    writer.write(data)
    line = await asyncio.wait_for(reader.readline(), 5)
    result: dict[str, Any] = json.loads(line)
    return result


async def test_commands_wait_for_negotiation_and_ids_echo(qmp_path: Path) -> None:
    reader, writer, greeting = await raw_session(qmp_path)
    assert greeting["QMP"]["capabilities"] == []
    answer = await exchange(reader, writer, b'{"execute": "stop", "id": 7}')
    assert answer == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 7,
    }
    answer = await exchange(
        reader, writer, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
    )
    assert answer["error"]["desc"] == "Capability 'oob' not available"
    assert await exchange(reader, writer, b'{"execute": "qmp_capabilities", "id": {"x": [1]}}') == {
        "return": {},
        "id": {"x": [1]},
    }
    writer.close()


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b"garbage\n", "JSON parse error: unexpected 'g'"),
        (b'{"execute": }', "JSON parse error"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'{"exec": "stop"}', "QMP input member 'exec' is unexpected"),
        (b'{"execute": 5}', "'execute' must be a string"),
        (b'{"execute": "stop", "arguments": []}', "'arguments' must be an object"),
        (b'{"exec-oob": "stop"}', "exec-oob needs the oob capability"),
    ],
)
async def test_bad_input_gets_an_error_and_the_session_goes_on(
    qmp_path: Path, data: bytes, desc: str
) -> None:
    reader, writer, _ = await raw_session(qmp_path)
    await exchange(reader, writer, b'{"execute": "qmp_capabilities"}')
    answer = await exchange(reader, writer, data)
    assert desc in answer["error"]["desc"]
    assert (await exchange(reader, writer, b'{"execute": "query-status"}'))["return"]["running"]
    writer.close()


async def test_an_oversized_message_closes_the_connection(
    qmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmp_wire, "MAX_MESSAGE", 1000)
    reader, writer, _ = await raw_session(qmp_path)
    answer = await exchange(reader, writer, b'{"execute": "' + b"x" * 2000)
    assert "over 1000 bytes" in answer["error"]["desc"]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    async with asyncio.timeout(5):
        client = QMPClient("after")
        await client.connect(str(qmp_path))
        assert (await run(client, "query-status"))["running"]
        await client.disconnect()


async def test_too_many_clients_get_a_qmp_error_and_no_greeting(
    qmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc_server, "MAX_CLIENTS", 1)
    _, first, _ = await raw_session(qmp_path)
    reader, writer = await asyncio.open_unix_connection(str(qmp_path))
    lines = (await asyncio.wait_for(reader.read(), 5)).splitlines()  # the refusal, then EOF
    assert [json.loads(x) for x in lines] == [
        {"error": {"class": "GenericError", "desc": "over 1 QMP clients"}}
    ]
    writer.close()
    first.close()


async def test_qmp_and_msgpack_sockets_share_one_core(sockdir: Path) -> None:
    from evmm.control import Client

    machine = FakeMachine()
    api, qpath = sockdir / "api.sock", sockdir / "q.sock"
    close = await start_control(machine, None, api_sock=api, qmp=f"unix:{qpath},server=on,wait=off")
    client = QMPClient("shared")
    await client.connect(str(qpath))
    async with Client(api) as c:
        await c.call("pause")
        assert (await next_event(client))["event"] == "STOP"
        assert (await run(client, "query-status"))["status"] == "paused"
    await client.disconnect()
    await close()
    assert not api.exists() and not qpath.exists()


async def test_closing_with_a_client_still_connected_reports_no_error(
    sockdir: Path, machine: FakeMachine
) -> None:
    # As at `quit`: the client that asked is still connected while the VMM closes.  Nothing may reach the
    # loop's exception handler (CPython 3.11's asyncio.streams turns a cancelled handler into a traceback).
    path = sockdir / "qmp.sock"
    close = await start_control(machine, None, api_sock=None, qmp=f"unix:{path},server,nowait")
    reader, writer = await asyncio.open_unix_connection(str(path))
    assert b'"QMP"' in await asyncio.wait_for(reader.readline(), 5)  # the greeting: it is being served
    await close()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, at EOF
    writer.close()
    await asyncio.sleep(
        0.05
    )  # done callbacks run: tests/conftest.py fails the test if one reached the handler
