#!/usr/bin/env python3
"""Measure virtio-blk's I/O path on this host (not a test): python scripts/bench_blk.py [--quick]

1. Through the device with the driver-side fake (tests/fakes/virtio_driver.py) on the real reactor loop
   (uvloop): 4 KiB random reads at queue depth 1 and 32, 4 KiB random writes at 32, 1 MiB sequential reads
   and writes at depth 8, for several worker-thread counts, with and without in-place cached reads.  The
   image is in the page cache, so this measures evmm's own cost per request (parse, hand-off, completion,
   interrupt) and the fake driver's, not the disk; "reactor" is the reactor thread's CPU time in the device.
2. How completions get back to the reactor: one eventfd written only when the reactor has not been told yet
   (what IoWorkers does) against ``loop.call_soon_threadsafe`` per completion, and against
   call_soon_threadsafe with the same "told once" flag, on asyncio and uvloop.
3. Linux AIO through ctypes (io_submit): how long the *submitting* thread is held for a buffered read of
   cold pages -- with a buffered fd io_submit does the read itself, so it would block the reactor.
4. ``preadv(..., RWF_NOWAIT)``: a read from the page cache done in place, which fails fast with EAGAIN when
   the pages are not cached; the cost of one against a round trip through a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import mmap
import os
import random
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evmm.devices.virtio.blk.backend import FileBackend, IoWorkers
from evmm.devices.virtio.blk.device import VirtioBlk
from tests.fakes.virtio_driver import MmioDriver

HEADER = struct.Struct("<IIQ")
MiB = 1 << 20
IMAGE_SIZE = 256 * MiB


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    except ImportError:
        return asyncio.new_event_loop()


class WakeIrq:
    """An Interrupt that wakes the benchmark's driver loop."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        self.event.set()


def run_device(
    image: Path,
    threads: int,
    *,
    size: int,
    depth: int,
    total: int,
    write: bool,
    rand: bool,
    inline: bool = True,
) -> tuple[float, float, int]:
    """Keep ``depth`` requests of ``size`` bytes in flight until ``total`` complete.

    Returns (wall seconds, seconds the device held the reactor, interrupts).
    """
    loop = new_loop()
    dev = VirtioBlk(FileBackend.open(image, False), io_threads=threads, inline_reads=inline)
    # Time the device's own work on the reactor (kicks and completions), apart from the fake driver's.
    in_device = [0.0]

    def timed(fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: object) -> None:
            t = time.thread_time()  # CPU time of the reactor thread: robust to a busy machine
            fn(*args)
            in_device[0] += time.thread_time() - t

        return run

    dev.queue_notify = timed(dev.queue_notify)  # type: ignore[method-assign]
    dev._on_completions = timed(dev._on_completions)  # type: ignore[method-assign]
    drv = MmioDriver(dev, loop=loop)
    drv.bring_up(event_idx=False)
    irq = WakeIrq()
    drv.transport._irq = irq
    q = drv.queues[0]
    sectors = IMAGE_SIZE // 512
    per = size // 512
    payload = os.urandom(size)
    rng = random.Random(1)
    next_seq = 0

    def post() -> None:
        nonlocal next_seq
        if rand:
            sector = rng.randrange(0, sectors - per) & ~7
        else:
            sector = next_seq
            next_seq = (next_seq + per) % (sectors - per)
        if write:
            q.add([HEADER.pack(1, 0, sector), payload], [1])
        else:
            q.add([HEADER.pack(0, 0, sector)], [size, 1])

    async def drive() -> None:
        done = 0
        posted = 0
        while posted < min(depth, total):
            post()
            posted += 1
        drv.kick(0)
        while done < total:
            await irq.event.wait()
            irq.event.clear()
            used = q.get_used()
            done += len(used)
            n = 0
            while n < len(used) and posted < total:
                post()
                posted += 1
                n += 1
            if n:
                drv.kick(0)

    t0 = time.perf_counter()
    loop.run_until_complete(drive())
    elapsed = time.perf_counter() - t0
    dev.reset()
    dev.close()
    loop.close()
    return elapsed, in_device[0], irq.count


def bench_device(image: Path, quick: bool) -> None:
    print("1. through the device (fake driver, uvloop reactor, image in the page cache); best of 3 runs.")
    print(
        "   'reactor' is the reactor thread's CPU time inside the device per request (parse, submit, complete,"
    )
    print("   in-place reads); the rest is the fake driver's own Python and the worker threads")
    n_rand = 5000 if quick else 20000
    n_seq = 64 if quick else 256
    workloads = [
        ("4k randread QD1", 4096, 1, n_rand // 4, False, True),
        ("4k randread QD32", 4096, 32, n_rand, False, True),
        ("4k randwrite QD32", 4096, 32, n_rand, True, True),
        ("1M seqread QD8", MiB, 8, n_seq, False, False),
        ("1M seqwrite QD8", MiB, 8, n_seq, True, False),
    ]
    for name, size, depth, total, write, rand in workloads:
        for inline in (False, True) if not write else (False,):
            for threads in (1, 2, 4, 8):
                runs = [
                    run_device(
                        image,
                        threads,
                        size=size,
                        depth=depth,
                        total=total,
                        write=write,
                        rand=rand,
                        inline=inline,
                    )
                    for _ in range(3)
                ]
                t, busy, irqs = min(runs)
                rate = f"{total / t:7.0f} IOPS" if size < MiB else f"{total * size / MiB / t:7.0f} MB/s"
                mode = " inline reads" if inline else ""
                print(
                    f"   {name:18s} threads={threads}{mode:13s} {rate}  reactor {busy / total * 1e6:6.1f} us/req"
                    f"  {total / irqs:5.1f} req/irq",
                    flush=True,
                )


def bench_delivery(quick: bool) -> None:
    print("2. completions back to the reactor: bursts of 32 trivial jobs on 4 threads, the next burst when")
    print("   the last one is back (us per completion; reactor callbacks per burst)")
    bursts = 500 if quick else 3000
    for loop_name in ("asyncio", "uvloop"):
        for mode in ("eventfd, told once", "call_soon_threadsafe each", "call_soon_threadsafe, told once"):
            loop = asyncio.new_event_loop() if loop_name == "asyncio" else new_loop()
            t, calls = _delivery(loop, mode, bursts)
            loop.close()
            n = bursts * 32
            print(
                f"   {loop_name:8s} {mode:32s} {t / n * 1e6:6.2f} us/completion, {calls / bursts:5.1f} callbacks/burst"
            )


def _delivery(loop: asyncio.AbstractEventLoop, mode: str, bursts: int) -> tuple[float, int]:
    import collections
    import queue as queue_mod

    burst = 32
    finished = loop.create_future()
    state = {"done": 0, "calls": 0, "bursts": 0}
    restart: list[Callable[[], None]] = []

    def job_done(count: int) -> None:
        state["done"] += count
        if state["done"] == burst:
            state["done"] = 0
            state["bursts"] += 1
            if state["bursts"] == bursts:
                finished.set_result(None)
            else:
                restart[0]()

    if mode.startswith("eventfd"):
        workers: IoWorkers[int] = IoWorkers(4, "bench", lambda e: -1)

        def on_ready() -> None:
            state["calls"] += 1
            got = workers.collect()
            if got:
                job_done(len(got))

        def start_burst() -> None:
            for i in range(burst):
                workers.submit(i, lambda: 0)

        loop.add_reader(workers.fd, on_ready)
        restart.append(start_burst)
        t0 = time.perf_counter()
        loop.call_soon(start_burst)
        loop.run_until_complete(finished)
        t = time.perf_counter() - t0
        loop.remove_reader(workers.fd)
        workers.close()
        return t, state["calls"]

    jobs: queue_mod.SimpleQueue[int | None] = queue_mod.SimpleQueue()
    results: collections.deque[int] = collections.deque()
    told = [False]
    once = mode.endswith("told once")

    def collect() -> None:
        state["calls"] += 1
        told[0] = False
        n = 0
        while results:
            results.popleft()
            n += 1
        if n:
            job_done(n)

    def each() -> None:
        state["calls"] += 1
        job_done(1)

    def worker() -> None:
        while jobs.get() is not None:
            if once:
                results.append(0)
                if not told[0]:
                    told[0] = True
                    loop.call_soon_threadsafe(collect)
            else:
                loop.call_soon_threadsafe(each)

    def start_burst_q() -> None:
        for i in range(burst):
            jobs.put(i)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for th in pool:
        th.start()
    restart.append(start_burst_q)
    t0 = time.perf_counter()
    loop.call_soon(start_burst_q)
    loop.run_until_complete(finished)
    t = time.perf_counter() - t0
    for _ in pool:
        jobs.put(None)
    for th in pool:
        th.join()
    return t, state["calls"]


# Linux AIO, <linux/aio_abi.h>: struct iocb is 64 bytes.
class Iocb(ctypes.Structure):
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


SYS_io_setup, SYS_io_destroy, SYS_io_submit, SYS_io_getevents = 206, 207, 209, 208
IOCB_CMD_PREAD = 0


def evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def bench_aio(image: Path, quick: bool) -> None:
    print("3. Linux AIO (ctypes io_submit), 64 KiB random reads of evicted pages, one at a time")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    n = 50 if quick else 200
    buf = mmap.mmap(-1, 1 << 16)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    for label, flags in (("buffered", 0), ("O_DIRECT", os.O_DIRECT)):
        try:
            fd = os.open(image, os.O_RDONLY | flags)
        except OSError as e:
            print(f"   {label}: cannot open ({e.strerror})")
            continue
        ctx = ctypes.c_ulong(0)
        if libc.syscall(SYS_io_setup, 64, ctypes.byref(ctx)) != 0:
            print(f"   io_setup failed: {os.strerror(ctypes.get_errno())}")
            os.close(fd)
            break
        rng = random.Random(2)
        submit = wait = 0.0
        for _ in range(n):
            evict(fd)
            cb = Iocb(aio_lio_opcode=IOCB_CMD_PREAD, aio_fildes=fd, aio_buf=addr, aio_nbytes=1 << 16)
            cb.aio_offset = rng.randrange(0, IMAGE_SIZE >> 16) << 16
            cbp = (ctypes.POINTER(Iocb) * 1)(ctypes.pointer(cb))
            ev = (IoEvent * 1)()
            t0 = time.perf_counter()
            r = libc.syscall(SYS_io_submit, ctx, 1, cbp)
            t1 = time.perf_counter()
            if r != 1:
                print(f"   {label}: io_submit failed: {os.strerror(ctypes.get_errno())}")
                break
            libc.syscall(SYS_io_getevents, ctx, 1, 1, ev, None)
            t2 = time.perf_counter()
            submit += t1 - t0
            wait += t2 - t1
        print(
            f"   {label:8s}: io_submit held the caller {submit / n * 1e6:7.1f} us, "
            f"then waiting for the event {wait / n * 1e6:7.1f} us (per read)"
        )
        libc.syscall(SYS_io_destroy, ctx)
        os.close(fd)
    del addr
    buf.close()


def bench_nowait(image: Path, quick: bool) -> None:
    print("4. one 4 KiB read from the page cache: preadv in place (RWF_NOWAIT) vs a worker round trip")
    n = 5000 if quick else 20000
    fd = os.open(image, os.O_RDONLY)
    buf = bytearray(4096)
    view = [memoryview(buf)]
    for off in range(0, 1 << 24, 4096):
        os.preadv(fd, view, off)  # warm 16 MiB
    t0 = time.perf_counter()
    for i in range(n):
        os.preadv(fd, view, (i % 4096) * 4096, os.RWF_NOWAIT)
    inline = (time.perf_counter() - t0) / n
    evict(fd)
    try:
        os.preadv(fd, view, 0, os.RWF_NOWAIT)
        cold = "returned data (not evicted?)"
    except BlockingIOError:
        cold = "EAGAIN at once, as documented"
    loop = new_loop()
    workers: IoWorkers[int] = IoWorkers(1, "bench", lambda e: -1)
    done = loop.create_future()
    count = 0

    def submit_next() -> None:
        workers.submit(count, lambda: os.preadv(fd, view, (count % 4096) * 4096))

    def on_ready() -> None:
        nonlocal count
        count += len(workers.collect())
        if count >= n:
            done.set_result(None)
        else:
            submit_next()

    loop.add_reader(workers.fd, on_ready)
    for off in range(0, 1 << 24, 4096):
        os.preadv(fd, view, off)
    t0 = time.perf_counter()
    submit_next()
    loop.run_until_complete(done)
    hop = (time.perf_counter() - t0) / n
    loop.remove_reader(workers.fd)
    workers.close()
    loop.close()
    os.close(fd)
    print(
        f"   in place: {inline * 1e6:.1f} us; worker round trip (QD1): {hop * 1e6:.1f} us; cold pages: {cold}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--dir", default=None, help="where to put the 256 MiB scratch image (default: /var/tmp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp") as d:
        image = Path(d) / "bench.img"
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(IMAGE_SIZE >> 20):
                f.write(chunk)
        print(f"host: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, scratch image {image}")
        bench_device(image, args.quick)
        bench_delivery(args.quick)
        bench_aio(image, args.quick)
        bench_nowait(image, args.quick)


if __name__ == "__main__":
    main()
