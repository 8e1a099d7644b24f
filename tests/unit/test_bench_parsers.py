"""evmm bench: fio and iperf3 JSON, the fio job lines, and py-spy's raw stacks."""

from __future__ import annotations

import json

import pytest

from evmm.bench import fio, iperf, profile

MiB = 1 << 20

# fio 3.33's --output-format=json for one job (trimmed to the fields read), as Debian 12's fio writes it.
FIO = {
    "fio version": "fio-3.33",
    "timestamp": 1795680963,
    "jobs": [
        {
            "jobname": "randread-qd1",
            "groupid": 0,
            "error": 0,
            "job options": {"name": "randread-qd1", "rw": "randread", "bs": "4096", "io_size": "1M"},
            "read": {"io_bytes": 1048576, "bw_bytes": 524288000, "iops": 128000.0, "runtime": 2},
            "write": {"io_bytes": 0, "bw_bytes": 0, "iops": 0.0, "runtime": 0},
        }
    ],
}

# iperf3 3.12 -J -R (trimmed): the totals of both ends.
IPERF = {
    "start": {
        "version": "iperf 3.12",
        "test_start": {"protocol": "TCP", "duration": 15, "omit": 3, "bytes": 0, "reverse": 1},
    },
    "end": {
        "sum_sent": {
            "seconds": 0.011174,
            "bytes": 10485760,
            "bits_per_second": 7507256130.3,
            "retransmits": 0,
        },
        "sum_received": {"seconds": 0.008525, "bytes": 10485760, "bits_per_second": 9840009384.2},
    },
}


def test_fio_result_from_json_with_noise_around_it() -> None:
    text = "fio: warning\n" + json.dumps(FIO, indent=1) + "\n"
    r = fio.parse(text, "randread-qd1")
    assert (r.rw, r.io_bytes, r.iops, r.runtime_ms) == ("read", 1048576, 128000.0, 2)
    assert r.mb_s == pytest.approx(524.288)


def test_fio_write_jobs_report_the_write_side() -> None:
    data = json.loads(json.dumps(FIO))
    job = data["jobs"][0]
    job["jobname"] = "seqwrite"
    job["read"], job["write"] = job["write"], job["read"]
    assert fio.parse(json.dumps(data), "seqwrite").rw == "write"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fio: failed to open /dev/vda", "no JSON"),
        ("{not json}", "does not parse"),
        (json.dumps({"jobs": []}), "no job"),
    ],
)
def test_fio_failures_say_what(text: str, message: str) -> None:
    with pytest.raises(fio.FioError, match=message):
        fio.parse(text, "randread-qd1")


def test_fio_job_errors_and_empty_jobs_fail() -> None:
    data = json.loads(json.dumps(FIO))
    data["jobs"][0]["error"] = 5
    with pytest.raises(fio.FioError, match="error 5"):
        fio.parse(json.dumps(data), "randread-qd1")
    data["jobs"][0]["error"] = 0
    data["jobs"][0]["read"]["io_bytes"] = 0
    with pytest.raises(fio.FioError, match="no I/O"):
        fio.parse(json.dumps(data), "randread-qd1")


def test_fio_jobs_fix_their_work() -> None:
    jobs = {j.name: j for j in fio.jobs(256 * MiB, quick=False)}
    assert set(jobs) == {"seqread", "seqwrite", "randread-qd1", "randread-qd32"}
    seq = jobs["seqread"].argv()
    assert f"--size={256 * MiB}" in seq and "--bs=1048576" in seq and "--direct=1" in seq
    rand = jobs["randread-qd32"].argv("/dev/vdb")
    assert "--iodepth=32" in rand and "--filename=/dev/vdb" in rand
    assert any(a.startswith("--io_size=") for a in rand) and "--randseed=1234" in rand
    assert fio.jobs(256 * MiB, quick=True)[0].bytes == 64 * MiB


def test_iperf_result() -> None:
    r = iperf.parse(json.dumps(IPERF))
    assert (r.sent_bytes, r.received_bytes) == (10485760, 10485760)
    assert r.gbit_s == pytest.approx(9.8400093842)
    assert (r.duration, r.omit, r.reverse) == (15, 3, True)


def test_iperf_errors() -> None:
    with pytest.raises(iperf.IperfError, match="unable to connect"):
        iperf.parse(json.dumps({"start": {}, "end": {}, "error": "unable to connect to server"}))
    with pytest.raises(iperf.IperfError, match="does not parse"):
        iperf.parse("iperf3: error")
    with pytest.raises(iperf.IperfError, match="sum_sent"):
        iperf.parse(json.dumps({"end": {}}))
    with pytest.raises(iperf.IperfError, match="test_start"):
        iperf.parse(json.dumps({"end": IPERF["end"]}))


def test_iperf_client_line() -> None:
    argv = iperf.client_argv("10.0.2.15", 15, 3, guest_sends=True)
    assert argv[:3] == ["iperf3", "-c", "10.0.2.15"] and "-R" in argv and "-J" in argv
    assert argv[argv.index("-t") + 1] == "15" and argv[argv.index("-O") + 1] == "3"
    assert "-R" not in iperf.client_argv("10.0.2.15", 15, 3, guest_sends=False)


# py-spy 0.4 record --format raw --threads: "thread (TID): NAME" first, then the frames, outermost first.
RAW = """\
thread (160): vcpu0;_bootstrap (threading.py:995);run (threading.py:975);_main (evmm/loop/vcpu_thread.py:120);run (evmm/kvm/vcpu.py:70) 30
thread (155): MainThread;<module> (evmm/__main__.py:5);run_machine (evmm/cli/run_cmd.py:191);queue_notify (evmm/devices/virtio/blk/device.py:88);parse (evmm/devices/virtio/blk/request.py:40) 50
thread (155): MainThread;<module> (evmm/__main__.py:5);run_machine (evmm/cli/run_cmd.py:191);queue_notify (evmm/devices/virtio/blk/device.py:91) 20
thread (155): MainThread;<module> (evmm/__main__.py:5);_find_and_load (<frozen importlib._bootstrap>:1176);<module> (evmm/machine/microvm.py:23);_create_fn (dataclasses.py:433) 10
garbage line
"""


def test_profile_summary_self_total_and_threads() -> None:
    s = profile.summarise(RAW)
    assert s.samples == 110
    assert s.self_time["parse (evmm/devices/virtio/blk/request.py)"] == 50
    assert s.self_time["queue_notify (evmm/devices/virtio/blk/device.py)"] == 20
    assert s.total_time["queue_notify (evmm/devices/virtio/blk/device.py)"] == 70
    assert "_bootstrap (threading.py)" not in s.total_time  # plumbing every thread shares
    assert s.threads["vCPU threads (in KVM_RUN, or handing an exit to the reactor)"] == 30
    assert s.threads["reactor (uvloop: devices, control, console)"] == 70
    assert s.threads["start-up (imports, building the VM)"] == 10
    assert s.imports == {"evmm/machine/microvm.py": 10}
    assert "63.6%" in s.table()
    assert profile.summarise("").table() == "no samples\n"
