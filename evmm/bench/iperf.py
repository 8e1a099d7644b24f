"""iperf3 for the virtio-net row (pure: command lines and JSON parsing).

The guest runs ``iperf3 -s``; the host side of the tap runs the client, so its JSON never crosses the serial
console.  ``-n`` fixes the bytes sent (the same work on both VMMs, which the benchmark checks); ``-R`` turns
the direction round (the guest sends).
"""

from __future__ import annotations

import json
from typing import Any

from evmm.record import record

PORT = 5201


class IperfError(Exception):
    pass


@record(frozen=True)
class IperfResult:
    sent_bytes: int
    received_bytes: int
    seconds: float
    bits_per_second: float  # as the receiver counted it

    @property
    def gbit_s(self) -> float:
        return self.bits_per_second / 1e9


def client_argv(server: str, nbytes: int, *, guest_sends: bool) -> list[str]:
    argv = ["iperf3", "-c", server, "-p", str(PORT), "-n", str(nbytes), "-J", "--connect-timeout", "10000"]
    if guest_sends:
        argv.append("-R")
    return argv


def parse(text: str) -> IperfResult:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise IperfError(f"iperf3's JSON does not parse: {e}; output: {text.strip()[:200]!r}") from None
    if not isinstance(data, dict):
        raise IperfError("iperf3's JSON is not an object")
    if data.get("error"):
        raise IperfError(f"iperf3: {data['error']}")
    try:
        end = data["end"]
        sent, received = end["sum_sent"], end["sum_received"]
        return IperfResult(
            sent_bytes=int(sent["bytes"]),
            received_bytes=int(received["bytes"]),
            seconds=float(received["seconds"]),
            bits_per_second=float(received["bits_per_second"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IperfError(f"iperf3's JSON lacks end.sum_sent/sum_received ({e})") from None
