"""The msgpack control server and ``evmm.control.Client`` over a real Unix socket, against a fake machine:
every method, several clients, hostile clients, events, the console, and the socket file's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import termios
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from evmm.control import Client, CommandError, Commands, ControlError, ErrorCode, start_control
from evmm.control import server as server_mod
from evmm.control.prompt import CommandsTarget, EscapeMenu, Status, render
from evmm.control.server import ControlServer
from evmm.errors import EvmmError
from evmm.exitcodes import EXIT_GUEST_POWEROFF, EXIT_GUEST_RESET
from evmm.rpc import server as rpc_server
from evmm.rpc.protocol import Decoder, encode_frame, request
from tests.fakes.machine import FakeConsole, FakeMachine, FakeMachineWithoutHotplug


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short: a Unix socket path is at most 107 bytes, and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="evmm-ctl-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def machine() -> FakeMachine:
    return FakeMachine(park_delay=0.01)


@pytest.fixture
def console() -> FakeConsole:
    return FakeConsole()


@pytest.fixture
async def sock(sockdir: Path, machine: FakeMachine, console: FakeConsole) -> AsyncIterator[Path]:
    path = sockdir / "api.sock"
    close = await start_control(machine, console, api_sock=path, qmp=None)
    yield path
    await close()
    assert not path.exists()


class Raw:
    """A client speaking bytes, to send what ``Client`` never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder()
        self.got: list[Any] = []

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Any:
        """The next message, or None at EOF."""
        while not self.got:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                return None
            self.got += self.decoder.feed(data)
        return self.got.pop(0)

    async def close(self) -> None:
        self.writer.close()


# ---- methods ------------------------------------------------------------------------------------------------


async def test_query_status_vm_and_commands(sock: Path) -> None:
    async with Client(sock) as c:
        assert await c.call("query-status") == {"state": "running", "running": True}
        vm = await c.call("query-vm")
        assert vm["memory"] == 256 << 20 and len(vm["vcpus"]) == 2
        names = {m["name"] for m in await c.call("query-commands")}
        assert {"pause", "resume", "shutdown", "quit", "reset", "device-replace", "console-attach"} <= names


async def test_pause_answers_after_parking_and_resume(sock: Path, machine: FakeMachine) -> None:
    machine.park_delay = 0.1
    async with Client(sock) as c:
        await c.subscribe()
        assert await c.call("pause") == {"state": "paused"}
        assert machine.paused
        ev = await c.next_event(5)
        assert ev is not None and (ev.event, ev.data) == ("state-changed", {"state": "paused"})
        assert await c.call("pause") == {"state": "paused"}  # already paused: no second pause
        assert machine.pause_calls == 1
        assert await c.call("query-status") == {"state": "paused", "running": False}
        assert await c.call("resume") == {"state": "running"}
        ev = await c.next_event(5)
        assert ev is not None and ev.data == {"state": "running"}
        assert await c.next_event(0.1) is None


async def test_quit_and_reset_stop_the_machine_naming_the_client(sockdir: Path) -> None:
    for method, code in (("quit", EXIT_GUEST_POWEROFF), ("reset", EXIT_GUEST_RESET)):
        machine = FakeMachine()
        path = sockdir / f"{method}.sock"
        close = await start_control(machine, None, api_sock=path, qmp=None)
        async with Client(path) as c:
            await c.subscribe()
            assert await c.call(method) == {}
            assert machine.stop_request is not None
            assert machine.stop_request[0] == code
            assert machine.stop_request[1].startswith(f"{method} by control client 1 (pid {os.getpid()})")
            events = [await c.next_event(2), await c.next_event(2)]
            assert [e.event for e in events if e] == ["state-changed", "shutdown"]
            with pytest.raises(ControlError, match="the VM is stopped") as info:
                await c.call("pause")
            assert info.value.code == ErrorCode.VM_STATE
        await close()


async def test_shutdown_presses_the_power_button_or_sends_ctrl_alt_del(
    sock: Path, machine: FakeMachine
) -> None:
    async with Client(sock) as c:
        assert await c.call("shutdown") == {"method": "acpi"}
        assert machine.power_presses == 1
        assert await c.call("shutdown", method="ctrl-alt-del") == {"method": "ctrl-alt-del"}
        assert machine.ctrl_alt_dels == 1
        machine.acpi = False  # a board without the ACPI block: Ctrl-Alt-Del instead
        assert await c.call("shutdown") == {"method": "ctrl-alt-del"}
        machine.i8042 = False
        with pytest.raises(ControlError, match="no i8042") as info:
            await c.call("shutdown")
        assert info.value.code == ErrorCode.FAILED
        with pytest.raises(ControlError, match="not one of acpi, ctrl-alt-del"):
            await c.call("shutdown", method="poweroff")


@pytest.mark.parametrize(
    ("method", "params", "code", "text"),
    [
        ("frobnicate", {}, ErrorCode.METHOD_NOT_FOUND, "unknown method 'frobnicate'"),
        ("pause", {"now": True}, ErrorCode.INVALID_PARAMS, "unknown parameter 'now'"),
        ("device-remove", {}, ErrorCode.INVALID_PARAMS, "parameter 'slot' is required"),
        ("device-remove", {"slot": None}, ErrorCode.INVALID_PARAMS, "parameter 'slot' is required"),
        ("device-remove", {"slot": 3}, ErrorCode.INVALID_PARAMS, "slot is a integer, not a string"),
        ("console-resize", {"rows": 0, "cols": 80}, ErrorCode.INVALID_PARAMS, "rows=0 is out of range"),
        ("console-resize", {"rows": True, "cols": 80}, ErrorCode.INVALID_PARAMS, "rows is a boolean"),
        (
            "device-replace",
            {"slot": "hp-blk0", "readonly": "yes", "path": "/x"},
            ErrorCode.INVALID_PARAMS,
            "readonly is a string",
        ),
        ("device-replace", {"slot": ""}, ErrorCode.INVALID_PARAMS, "1 to 4096 characters"),
        ("console-input", {"data": 5}, ErrorCode.INVALID_PARAMS, "data is a integer, not a binary"),
    ],
)
async def test_bad_requests_get_structured_errors(
    sock: Path, method: str, params: dict[str, Any], code: int, text: str
) -> None:
    async with Client(sock) as c:
        with pytest.raises(ControlError) as info:
            await c.call(method, params)
        assert info.value.code == code
        assert text in str(info.value) and "\n" not in str(info.value)
        assert await c.call("query-status")  # and the connection goes on


async def test_a_bug_in_a_method_is_an_internal_error_not_a_dead_vmm(
    sock: Path, machine: FakeMachine
) -> None:
    machine.fail_describe = True
    async with Client(sock) as c:
        with pytest.raises(
            ControlError, match="query-vm failed inside evmm: RuntimeError: describe broke"
        ) as info:
            await c.call("query-vm")
        assert info.value.code == ErrorCode.INTERNAL_ERROR
        assert (await c.call("query-status"))["state"] == "running"


async def test_a_machine_that_never_parks_times_out() -> None:
    commands = Commands(FakeMachine(park_delay=10), pause_timeout=0.05)
    with pytest.raises(CommandError, match=r"the vCPUs did not reach paused within 0\.05 s") as info:
        await commands.call("pause", client="test")
    assert info.value.code == ErrorCode.FAILED


# ---- hot-replace ------------------------------------------------------------------------------------------------


async def test_hot_replace_fills_and_empties_slots(sock: Path, machine: FakeMachine, sockdir: Path) -> None:
    image = sockdir / "disk.img"
    image.write_bytes(bytes(4096))
    async with Client(sock) as c:
        await c.subscribe()
        slots = (await c.call("query-hotplug"))["slots"]
        assert [s["id"] for s in slots] == ["hp-blk0", "hp-blk1", "hp-net0"]
        slot = await c.call("device-replace", slot="hp-blk0", path=str(image), readonly=True)
        assert slot == {"id": "hp-blk0", "kind": "blk", "occupied": True, "backend": str(image)}
        spec = machine.specs["hp-blk0"]
        assert spec.path == image and spec.readonly  # type: ignore[union-attr]
        ev = await c.next_event(2)
        assert ev is not None and ev.event == "device-changed"
        assert ev.data == {"slot": "hp-blk0", "kind": "blk", "action": "replaced", "backend": str(image)}
        await c.call("device-replace", slot="hp-net0", tap="tap7", mac="52:54:00:12:34:56")
        assert machine.specs["hp-net0"].tap == "tap7"  # type: ignore[union-attr]
        await c.call("device-remove", slot="hp-blk0")
        assert not machine.slots["hp-blk0"]["occupied"]
        events = [await c.next_event(2), await c.next_event(2)]
        assert [(e.data["slot"], e.data["action"]) for e in events if e] == [
            ("hp-net0", "replaced"),
            ("hp-blk0", "removed"),
        ]


@pytest.mark.parametrize(
    ("params", "code", "text"),
    [
        (
            {"slot": "hp-blk9", "path": "/x"},
            ErrorCode.INVALID_PARAMS,
            "no hot-replace slot 'hp-blk9' (slots: hp-blk0",
        ),
        ({"slot": "hp-blk0", "tap": "tap0"}, ErrorCode.INVALID_PARAMS, "hp-blk0 is a disk slot: give path"),
        ({"slot": "hp-blk0"}, ErrorCode.INVALID_PARAMS, "give path"),
        ({"slot": "hp-net0", "path": "/x"}, ErrorCode.INVALID_PARAMS, "hp-net0 is a network slot: give tap"),
        ({"slot": "hp-net0", "tap": "x" * 16}, ErrorCode.INVALID_PARAMS, "not 1 to 15 characters"),
        (
            {"slot": "hp-net0", "tap": "t", "mac": "01:00:00:00:00:01"},
            ErrorCode.INVALID_PARAMS,
            "not a unicast MAC",
        ),
        ({"slot": "hp-net0", "tap": "t", "mac": "nope"}, ErrorCode.INVALID_PARAMS, "not a unicast MAC"),
        (
            {"slot": "hp-blk0", "path": "/no/such.img"},
            ErrorCode.FAILED,
            "device-replace: /no/such.img: no such file",
        ),
    ],
)
async def test_hot_replace_errors(sock: Path, params: dict[str, Any], code: int, text: str) -> None:
    async with Client(sock) as c:
        with pytest.raises(ControlError) as info:
            await c.call("device-replace", params)
        assert info.value.code == code and text in str(info.value), str(info.value)


async def test_removing_an_empty_slot_is_the_machines_error(sock: Path) -> None:
    async with Client(sock) as c:
        with pytest.raises(ControlError, match="device-remove: hp-blk1 is already empty"):
            await c.call("device-remove", slot="hp-blk1")


async def test_a_machine_without_slots_says_so(sockdir: Path) -> None:
    path = sockdir / "nohp.sock"
    close = await start_control(FakeMachineWithoutHotplug(), None, api_sock=path, qmp=None)
    async with Client(path) as c:
        with pytest.raises(ControlError, match="query-hotplug: this machine has no hot-replace slots"):
            await c.call("query-hotplug")
        with pytest.raises(
            ControlError, match="console-attach: this VM's console is not on the control socket"
        ):
            await c.console_attach()
    await close()


# ---- many clients, hostile clients -------------------------------------------------------------------------------


async def test_several_clients_at_once(sock: Path, machine: FakeMachine) -> None:
    clients = [await Client(sock).connect() for _ in range(8)]
    try:
        for c in clients:
            await c.subscribe()
        results = await asyncio.gather(*(c.call("query-status") for c in clients), clients[0].call("pause"))
        assert results[-1] == {"state": "paused"}
        for c in clients:  # every subscriber hears about the pause
            ev = await c.next_event(2)
            assert ev is not None and ev.data == {"state": "paused"}
        # Overlapping calls on one connection are answered to the right callers.
        answers = await asyncio.gather(
            *(clients[1].call("query-status") for _ in range(20)),
            clients[1].call("nope"),
            return_exceptions=True,
        )
        assert all(a == {"state": "paused", "running": False} for a in answers[:-1])
        assert isinstance(answers[-1], ControlError)
    finally:
        for c in clients:
            await c.close()


async def test_garbage_gets_an_error_and_the_vmm_serves_others(sock: Path) -> None:
    raw = await Raw.open(sock)
    await raw.send(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # a frame that is not msgpack
    answer = await raw.recv()
    assert answer["id"] is None and answer["error"]["code"] == ErrorCode.PARSE_ERROR
    await raw.send(encode_frame({"id": 9, "method": 1}))  # a map that is no request: the id comes back
    answer = await raw.recv()
    assert answer["id"] == 9 and answer["error"]["code"] == ErrorCode.INVALID_REQUEST
    await raw.send(encode_frame(request(10, "query-status")))
    assert (await raw.recv())["result"]["state"] == "running"
    await raw.send(b"GET / HTTP/1.1\r\n\r\n")  # a length of 0x47455420: far over the limit
    answer = await raw.recv()
    assert answer["error"]["code"] == ErrorCode.FRAME_TOO_LARGE
    assert await raw.recv() is None  # and hung up
    async with Client(sock) as c:
        assert (await c.call("query-status"))["state"] == "running"


async def test_an_oversized_frame_header_closes_only_that_connection(sock: Path) -> None:
    async with Client(sock) as bystander:
        raw = await Raw.open(sock)
        await raw.send(struct.pack(">I", (1 << 20) + 1) + b"x" * 100)
        assert (await raw.recv())["error"]["code"] == ErrorCode.FRAME_TOO_LARGE
        assert await raw.recv() is None
        assert (await bystander.call("query-status"))["state"] == "running"


async def test_disconnecting_mid_request_harms_nothing(sock: Path, machine: FakeMachine) -> None:
    machine.park_delay = 0.2
    raw = await Raw.open(sock)
    await raw.send(encode_frame(request(1, "pause")) + encode_frame(request(2, "query-vm")))
    raw.writer.transport.abort()  # gone before any answer
    await asyncio.sleep(0.4)
    async with Client(sock) as c:
        assert (await c.call("query-status"))["state"] == "paused"
        assert await c.call("resume") == {"state": "running"}


async def test_half_a_frame_then_gone(sock: Path) -> None:
    raw = await Raw.open(sock)
    await raw.send(encode_frame(request(1, "quit"))[:-2])
    await raw.close()
    await asyncio.sleep(0.05)
    async with Client(sock) as c:
        assert (await c.call("query-status"))["state"] == "running"


async def test_too_many_clients(sock: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_server, "MAX_CLIENTS", 2)
    a, b = await Client(sock).connect(), await Client(sock).connect()
    await a.call("query-status")
    await b.call("query-status")
    raw = await Raw.open(sock)
    answer = await raw.recv()
    assert answer["error"]["code"] == ErrorCode.TOO_MANY_CLIENTS
    assert await raw.recv() is None
    await a.close()
    await b.close()


async def test_a_client_that_never_reads_is_dropped(
    sock: Path, console: FakeConsole, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc_server, "MAX_QUEUED", 1 << 16)
    sleeper = await Raw.open(sock)
    await sleeper.send(encode_frame(request(1, "console-attach")))
    reader_ok = await Client(sock).connect()
    await reader_ok.console_attach(replay=False)
    got = bytearray()
    for _ in range(200):  # 200 * 16 KiB: far more than the socket buffers and MAX_QUEUED hold
        console.output(b"x" * (16 << 10))
        await asyncio.sleep(0)
    while len(got) < 200 * (16 << 10):
        async for chunk in reader_ok.console_output():
            got += chunk
            break
    assert len(got) == 200 * (16 << 10)
    # The sleeper was cut off: it finds its answer, some output, then the end.
    seen, end = 0, False
    while True:
        try:
            data = await asyncio.wait_for(sleeper.reader.read(1 << 20), 2)
        except (ConnectionError, TimeoutError):
            break
        if not data:
            end = True
            break
        seen += len(data)
    assert end and seen < 200 * (16 << 10)
    await reader_ok.close()


# ---- events and console ---------------------------------------------------------------------------------------


async def test_events_reach_subscribers_only(sock: Path, machine: FakeMachine) -> None:
    async with Client(sock) as sub, Client(sock) as other:
        assert await sub.subscribe() == "running"
        await other.call("query-status")
        machine.emit("boot-marker", {"ms": 123.4})
        ev = await sub.next_event(2)
        assert ev is not None and (ev.event, ev.data) == ("boot-marker", {"ms": 123.4})
        assert ev.timestamp > 1.6e9
        assert await other.next_event(0.1) is None
        await sub.call("unsubscribe")
        machine.emit("boot-marker", {"ms": 1.0})
        assert await sub.next_event(0.1) is None


async def test_console_attach_output_input_and_detach(sock: Path, console: FakeConsole) -> None:
    console.output(b"earlier output\r\n")
    async with Client(sock) as a, Client(sock) as b:
        assert await a.console_attach() == b"earlier output\r\n"
        assert await b.console_attach(replay=False) == b""
        console.output(b"login: ")
        for c in (a, b):
            async for chunk in c.console_output():
                assert chunk == b"login: "
                break
        a.console_input(b"root\n")
        await b.call("console-input", data="ls\n")  # str is taken as UTF-8
        await a.call("query-status")  # after a's input in order
        assert bytes(console.injected) == b"root\nls\n"
        await b.console_detach()
        console.output(b"# ")
        async for chunk in a.console_output():
            assert chunk == b"# "
            break
        await b.call("query-status")
        assert b._console.empty()
        assert await a.call("console-resize", rows=40, cols=120) == {
            "rows": 40,
            "cols": 120,
            "applied": False,
        }


async def test_console_scrollback_is_bounded(sock: Path, console: FakeConsole) -> None:
    console.output(b"a" * (server_mod.SCROLLBACK + 100) + b"END")
    async with Client(sock) as c:
        replay = await c.console_attach()
        assert len(replay) == server_mod.SCROLLBACK and replay.endswith(b"END")


async def test_quit_answer_and_shutdown_event_reach_clients_before_the_socket_closes(
    sockdir: Path,
) -> None:
    machine = FakeMachine()
    path = sockdir / "q.sock"
    close = await start_control(machine, None, api_sock=path, qmp=None)
    c = await Client(path).connect()
    await c.subscribe()
    assert await c.call("quit") == {}
    await asyncio.sleep(0)  # the machine stops on the next loop turn
    await close()  # as evmm run does once the machine has stopped
    names = [ev.event async for ev in c.events()]
    assert names == ["state-changed", "shutdown"]
    with pytest.raises(EvmmError, match="the VMM closed the control connection"):
        await c.call("query-status")
    await c.close()
    assert not path.exists()


# ---- the socket file ------------------------------------------------------------------------------------------


async def test_client_errors_are_one_line(sockdir: Path) -> None:
    with pytest.raises(EvmmError, match="no control socket there"):
        await Client(sockdir / "missing.sock").connect()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sockdir / "dead.sock"))
    dead.close()
    with pytest.raises(EvmmError, match="nothing is listening"):
        await Client(sockdir / "dead.sock").connect()


async def test_a_stale_socket_is_replaced_a_live_one_and_a_file_are_not(sockdir: Path) -> None:
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    close = await start_control(FakeMachine(), None, api_sock=stale, qmp=None)
    assert stale.stat().st_mode & 0o777 == 0o600
    with pytest.raises(EvmmError, match="in use by another program"):
        await start_control(FakeMachine(), None, api_sock=stale, qmp=None)
    await close()
    plain = sockdir / "file"
    plain.write_text("x")
    with pytest.raises(EvmmError, match="exists and is not a socket"):
        await start_control(FakeMachine(), None, api_sock=plain, qmp=None)
    with pytest.raises(EvmmError, match="cannot listen"):
        await start_control(FakeMachine(), None, api_sock=sockdir / ("x" * 120), qmp=None)
    with pytest.raises(EvmmError, match="--qmp"):
        await start_control(FakeMachine(), None, api_sock=sockdir / "ok.sock", qmp="tcp:1234")
    assert not (sockdir / "ok.sock").exists()  # a bad --qmp starts nothing


async def test_answers_are_msgpack_frames_on_the_wire(sock: Path) -> None:
    raw = await Raw.open(sock)
    await raw.send(encode_frame(request("abc", "query-status")))
    header = await raw.reader.readexactly(4)
    payload = await raw.reader.readexactly(struct.unpack(">I", header)[0])
    assert msgpack.unpackb(payload) == {"id": "abc", "result": {"state": "running", "running": True}}
    await raw.close()


# ---- evmm ctl and evmm console, as processes ------------------------------------------------------------------


async def evmm(*argv: str, stdin: int | None = None, stdout: int | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "evmm",
        *argv,
        stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=stdout if stdout is not None else asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stdout is None else stdout,
    )


async def ctl(sock: Path, *argv: str) -> tuple[int, str, str]:
    proc = await evmm("ctl", str(sock), *argv)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_ctl_prints_results_and_types_values(sock: Path, machine: FakeMachine, sockdir: Path) -> None:
    code, out, err = await ctl(sock, "query-status")
    assert code == 0 and "running" in out and err == ""
    code, out, _ = await ctl(sock, "pause", "--json")
    assert code == 0 and json.loads(out) == {"state": "paused"}
    image = sockdir / "x.img"
    image.write_bytes(b"x")
    code, out, _ = await ctl(sock, "device-replace", "slot=hp-blk1", f"path={image}", "readonly=on", "--json")
    assert code == 0 and json.loads(out)["backend"] == str(image)
    assert machine.specs["hp-blk1"].readonly  # type: ignore[union-attr]
    code, out, _ = await ctl(sock, "console-resize", "rows=0x10", "cols=80", "--json")
    assert json.loads(out) == {"rows": 16, "cols": 80, "applied": False}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frob"], "evmm: frob: unknown method 'frob' (query-commands lists them)"),
        (["device-replace", "slot=hp-blk0", "readonly=maybe"], "evmm: ctl: readonly='maybe' is not on/off"),
        (["console-resize", "rows=many", "cols=1"], "evmm: ctl: rows='many' is not a number"),
        (["pause", "now"], "evmm: ctl: 'now' is not KEY=VALUE"),
        (["device-remove", "slot=hp-blk0"], "evmm: device-remove: hp-blk0 is already empty"),
    ],
)
async def test_ctl_errors_are_one_line(sock: Path, argv: list[str], message: str) -> None:
    code, out, err = await ctl(sock, *argv)
    assert (code, out, err) == (1, "", message + "\n")


async def test_ctl_on_a_missing_socket(sockdir: Path) -> None:
    code, _, err = await ctl(sockdir / "none.sock", "query-status")
    assert code == 1
    assert (
        err
        == f"evmm: {sockdir / 'none.sock'}: no control socket there (is the VM running with --api-sock?)\n"
    )


async def test_ctl_events_streams_until_the_vm_stops(sockdir: Path) -> None:
    machine = FakeMachine()
    path = sockdir / "ev.sock"
    close = await start_control(machine, None, api_sock=path, qmp=None)
    proc = await evmm("ctl", str(path), "events", "--json")
    assert proc.stdout is not None
    async with Client(path) as c:
        raw = b""
        for _ in range(100):  # until the events client has subscribed and hears one
            machine.emit("boot-marker", {"ms": 5.0})
            with contextlib.suppress(TimeoutError):
                raw = await asyncio.wait_for(proc.stdout.readline(), 0.2)
                break
        line = json.loads(raw)
        assert (line["event"], line["data"]) == ("boot-marker", {"ms": 5.0})
        await c.call("quit")
    await asyncio.sleep(0.05)
    await close()
    rest = (await asyncio.wait_for(proc.stdout.read(), 10)).decode().splitlines()
    events = [json.loads(x)["event"] for x in rest]
    assert events[-2:] == ["state-changed", "shutdown"] and set(events[:-2]) <= {"boot-marker"}
    assert await proc.wait() == 0


class Pty:
    """A terminal for a child process: the test holds the master side."""

    def __init__(self, rows: int = 30, cols: int = 100) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.saved = termios.tcgetattr(self.slave)
        os.set_blocking(self.master, False)
        self.buf = bytearray()

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def expect(self, text: bytes, timeout: float = 10.0) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while text not in self.buf:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {text!r} in {bytes(self.buf)!r}")
            try:
                self.buf += os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                await asyncio.sleep(0.02)
        out = bytes(self.buf)
        self.buf = self.buf[self.buf.index(text) + len(text) :]
        return out

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


async def test_console_attach_type_resize_detach_reattach_quit(sockdir: Path) -> None:
    machine, console = FakeMachine(), FakeConsole()
    commands = Commands(machine)
    path = sockdir / "con.sock"
    srv = ControlServer(commands, console, path)
    await srv.start()
    console.output(b"booted\r\nguest# ")
    term = Pty()
    try:
        proc = await evmm("console", str(path), stdin=term.slave, stdout=term.slave)
        await term.expect(b"Ctrl-] for the menu")
        await term.expect(b"guest# ")  # the replay
        assert termios.tcgetattr(term.slave)[3] & termios.ICANON == 0  # raw while attached
        term.type(b"uname\r")
        for _ in range(100):
            if bytes(console.injected) == b"uname\r":
                break
            await asyncio.sleep(0.02)
        assert bytes(console.injected) == b"uname\r"
        console.output(b"Linux\r\n")
        await term.expect(b"Linux")
        term.type(b"\x1d]")  # a literal Ctrl-]
        term.resize(50, 132)
        os.kill(proc.pid, signal.SIGWINCH)
        for _ in range(100):
            if commands.console_size == (50, 132) and console.injected.endswith(b"\x1d"):
                break
            await asyncio.sleep(0.02)
        assert commands.console_size == (50, 132) and console.injected.endswith(b"\x1d")
        term.type(b"\x1dp")  # the menu: pause
        await term.expect(b"paused in")
        assert machine.paused
        term.type(b"\x1dd")
        await term.expect(b"detached; the VM keeps running")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert termios.tcgetattr(term.slave) == term.saved  # the terminal is restored
        assert machine.stop_request is None

        proc = await evmm("console", str(path), stdin=term.slave, stdout=term.slave)
        await term.expect(b"(VM paused)")
        await term.expect(b"Linux")  # replayed again
        term.type(b"\x1dr")
        await term.expect(b"running in")
        term.type(b"\x1dq")
        await asyncio.sleep(0.2)
        assert machine.stop_request is not None and machine.stop_request[1].startswith(
            "quit by control client"
        )
        await srv.close()
        await term.expect(b"the VM stopped: quit by control client")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert termios.tcgetattr(term.slave) == term.saved
    finally:
        await srv.close()
        term.close()


# ---- the escape menu -------------------------------------------------------------------------------------------


class RecordingTarget:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def status(self) -> Status:
        self.calls.append("status")
        return Status("running", 2, 3725.0)

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def quit(self) -> None:
        self.calls.append("quit")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_menu_filters_input_and_acts_on_keys() -> None:
    target, shown, detached = RecordingTarget(), bytearray(), []
    menu = EscapeMenu(target, shown.extend, detach=lambda: detached.append(True))
    assert menu.feed(b"ls\r") == b"ls\r"
    assert menu.feed(b"a\x1d]b\x1d\x1dc") == b"a\x1db\x1dc"  # ] and a second Ctrl-] are literal Ctrl-]s
    assert menu.feed(b"\x1d") == b"" and menu.is_open  # the menu spans reads
    await settle()
    assert b"running" in shown and b"2 vCPUs" in shown and b"up 1:02:05" in shown and b"d detach" in shown
    assert menu.feed(b"p") == b""
    await settle()
    assert target.calls[-2:] == ["pause", "status"] and b"paused in" in shown
    assert menu.feed(b"\x1dr\x1dq\x1dx") == b""
    await settle()
    assert "resume" in target.calls and "quit" in target.calls
    assert b"back to the console" in shown
    menu.feed(b"\x1dd")
    assert detached == [True]


async def test_menu_through_consoleio_escape_hook() -> None:
    target, shown, sent = RecordingTarget(), bytearray(), bytearray()
    menu = EscapeMenu(target, shown.extend, send=sent.extend)
    menu.on_escape(b"]")
    assert bytes(sent) == b"\x1d"
    menu.on_escape(b"?")
    await settle()
    assert b"p pause" in shown and b"detach" not in shown  # evmm run has nothing to detach from
    menu.on_escape(b"p")
    menu.on_escape(b"q")
    await settle()
    assert {"pause", "quit"} <= set(target.calls)


async def test_menu_on_the_command_core(machine: FakeMachine) -> None:
    shown = bytearray()
    commands = Commands(machine)
    menu = EscapeMenu(CommandsTarget(commands), shown.extend)
    menu.on_escape(b"p")
    for _ in range(100):
        if b"paused in" in shown:
            break
        await asyncio.sleep(0.01)
    assert machine.paused and b"paused in" in shown
    menu.on_escape(b"q")
    await settle()
    assert machine.stop_request == (EXIT_GUEST_POWEROFF, "quit by the console menu")
    assert commands.stop_cause == ("quit", "the console menu")


def test_status_line_rendering() -> None:
    line = render(Status("paused", 1, 59.0), "hello", detach=True, width=80)
    assert line.startswith(b"\r\n") and line.endswith(b"\r\n")
    text = re.sub(rb"\x1b\[[0-9;]*m", b"", line)
    assert text == b"\r\n evmm  paused \xc2\xb7 1 vCPU \xc2\xb7 up 0:00:59 \xe2\x94\x82 hello\r\n"


async def test_closing_while_a_request_is_in_flight_reports_no_error(sockdir: Path) -> None:
    # The VMM's exit path with a client mid-request (a pause waiting for vCPUs to park): close() cancels its
    # session.  Nothing may reach the loop's exception handler, which prints a traceback on the guest's
    # console (CPython 3.11's asyncio.streams turns a cancelled connection handler into one).
    path = sockdir / "api.sock"
    close = await start_control(FakeMachine(park_delay=30), None, api_sock=path, qmp=None)
    raw = await Raw.open(path)
    await raw.send(encode_frame(request(1, "pause")))
    await asyncio.sleep(0.1)  # the server is inside the pause, waiting for the vCPUs
    await close()
    assert await raw.recv() is None  # dropped, at EOF, without an answer
    await asyncio.sleep(
        0.05
    )  # done callbacks run: tests/conftest.py fails the test if one reached the handler
