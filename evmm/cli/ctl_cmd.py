"""``evmm ctl SOCK METHOD [KEY=VALUE...]``: one control request from the shell; ``evmm ctl SOCK events`` streams.

Values are typed by the method's own parameter table (``query-commands``): ``readonly=on`` is a boolean,
``rows=40`` an integer, anything else a string, so a shell user never writes msgpack or JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.pretty import Pretty
from rich.table import Table

from evmm.control.client import Client, ControlError
from evmm.errors import EvmmError

_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ctl",
        help="send a control request to a running VM",
        description="Send METHOD with KEY=VALUE parameters to the VM listening on SOCK (evmm run --api-sock "
        "SOCK) and print the result. `evmm ctl SOCK query-commands` lists the methods; `evmm ctl SOCK "
        "events` prints the VM's events until it stops.",
    )
    p.add_argument("sock", type=Path, metavar="SOCK", help="the VM's control socket")
    p.add_argument("method", metavar="METHOD", help="e.g. query-status, pause, resume, shutdown, events")
    p.add_argument(
        "params", nargs="*", metavar="KEY=VALUE", help="parameters, e.g. slot=hp-blk0 path=disk.img"
    )
    p.add_argument("--json", action="store_true", help="print JSON (one object per line for events)")
    p.set_defaults(func=run)


def parse_params(words: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise EvmmError(f"ctl: {word!r} is not KEY=VALUE")
        if key in out:
            raise EvmmError(f"ctl: {key} given twice")
        out[key] = value
    return out


def coerce(method: str, params: dict[str, str], schema: list[dict[str, Any]]) -> dict[str, Any]:
    """Shell words to typed values, by the method's parameter table; unknown names are left to the VMM."""
    table: dict[str, Any] = next((m.get("params", {}) for m in schema if m.get("name") == method), {})
    out: dict[str, Any] = {}
    for key, value in params.items():
        kind = table.get(key, {}).get("type")
        if kind == "boolean":
            if value.lower() not in _TRUE | _FALSE:
                raise EvmmError(f"ctl: {key}={value!r} is not on/off")
            out[key] = value.lower() in _TRUE
        elif kind == "integer":
            try:
                out[key] = int(value, 0)
            except ValueError:
                raise EvmmError(f"ctl: {key}={value!r} is not a number") from None
        elif kind == "binary":
            out[key] = value.encode()
        else:
            out[key] = value
    return out


def plain(value: Any) -> Any:
    """JSON-ready: bytes as text (console data is text to a person)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def show_commands(console: Console, schema: list[dict[str, Any]]) -> None:
    table = Table("method", "parameters", "what it does")
    for m in schema:
        params = m.get("params", {})
        words = [f"{k}{'' if p.get('required') else '?'}:{p.get('type')}" for k, p in params.items()]
        table.add_row(f"[bold]{m.get('name')}[/]", " ".join(words), str(m.get("doc", "")))
    console.print(table)


def show(console: Console, value: Any) -> None:
    """A result, readably: a map of scalars as a two-column table, a list of like maps as a table."""
    value = plain(value)
    scalar = (str, int, float, bool, type(None))
    if value == {} or value is None:
        console.print("ok")
    elif isinstance(value, dict) and all(isinstance(v, scalar) for v in value.values()):
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        for k, v in value.items():
            table.add_row(f"[bold]{k}[/]", str(v))
        console.print(table)
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) for v in value)
        and all(all(isinstance(x, scalar) for x in v.values()) for v in value)
    ):
        columns: list[str] = []
        for row in value:
            columns += [k for k in row if k not in columns]
        table = Table(*columns)
        for row in value:
            table.add_row(*(str(row.get(c, "")) for c in columns))
        console.print(table)
    elif isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        show(console, next(iter(value.values())))  # {"slots": [...]}: the list is the answer
    else:
        console.print(Pretty(value))


async def _call(sock: Path, method: str, params: dict[str, str]) -> Any:
    async with Client(sock) as client:
        if params:
            schema = await client.call("query-commands")
            return await client.call(method, coerce(method, params, schema))
        return await client.call(method)


async def _events(sock: Path, as_json: bool, console: Console) -> None:
    async with Client(sock) as client:
        state = await client.subscribe()
        if not as_json:
            console.print(f"[dim]VM {state}; waiting for events (Ctrl-C to stop)[/]")
        async for ev in client.events():
            if as_json:
                line = {"event": ev.event, "data": plain(ev.data), "timestamp": ev.timestamp}
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()
            else:
                when = (
                    time.strftime("%H:%M:%S", time.localtime(ev.timestamp))
                    + f".{int(ev.timestamp * 1000) % 1000:03d}"
                )
                console.print(
                    f"[dim]{when}[/] [bold]{ev.event}[/] {json.dumps(plain(ev.data))}", highlight=False
                )


def run(args: argparse.Namespace) -> int:
    console = Console()
    params = parse_params(args.params)
    if args.method == "events":
        if params:
            raise EvmmError("ctl: events takes no parameters")
        asyncio.run(_events(args.sock, args.json, console))
        return 0
    try:
        result = asyncio.run(_call(args.sock, args.method, params))
    except ControlError as e:
        text = str(e)
        raise EvmmError(text if text.startswith(args.method) else f"{args.method}: {text}") from None
    if args.json:
        print(json.dumps(plain(result), indent=2))
    elif args.method == "query-commands" and isinstance(result, list):
        show_commands(console, result)
    else:
        show(console, result)
    return 0
