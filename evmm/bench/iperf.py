"""iperf3 for the virtio-net row (pure: command lines and JSON parsing).

The guest runs ``iperf3 -s``; the host side of the tap runs the client, so its JSON never crosses the serial
console.  Streams are timed (``-t``), after ``-O`` seconds of warm-up the totals leave out (TCP's slow start,
which under nested virtualisation lasts seconds): the same test on both VMMs, which the benchmark checks from
what iperf3 reports it ran.  A fixed byte count (``-n``) was tried first and given up: guest -> host streams
run at a few Mbit/s in the one-vCPU KVM test host, on either VMM, so 256 MiB took longer than any sensible
timeout and a short stream measured mostly slow start.  ``-R`` turns the direction round (the guest sends).
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
    duration: int  # the test asked for: -t seconds (0 for a byte count)
    omit: int  # -O seconds of warm-up left out of the totals
    reverse: bool  # -R: the server (the guest) sent

    @property
    def gbit_s(self) -> float:
        return self.bits_per_second / 1e9


def client_argv(server: str, seconds: int, omit: int, *, guest_sends: bool) -> list[str]:
    argv = ["iperf3", "-c", server, "-p", str(PORT), "-t", str(seconds), "-O", str(omit), "-J"]
    argv += ["--connect-timeout", "10000"]
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
        test = data["start"]["test_start"]
        return IperfResult(
            sent_bytes=int(sent["bytes"]),
            received_bytes=int(received["bytes"]),
            seconds=float(received["seconds"]),
            bits_per_second=float(received["bits_per_second"]),
            duration=int(test["duration"]),
            omit=int(test.get("omit", 0)),
            reverse=bool(test.get("reverse", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IperfError(f"iperf3's JSON lacks start.test_start or end.sum_sent/sum_received ({e})") from None
