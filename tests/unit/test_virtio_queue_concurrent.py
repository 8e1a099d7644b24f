"""The ring fields a running driver reads while the device writes them, watched from a C thread.

A guest's vCPU reads used->idx and avail_event without the GIL and without waiting for the device, so what
matters is every intermediate value the device's stores leave in memory, which no Python thread can see.
A C thread on another CPU polls the field while the queue stores 0, 1, 2, ... 65535 in turn; it must never
see the field go backwards (a transient or torn store).  (``struct.pack_into`` zeroes its destination before
writing, CPython's s_pack_internal: used as the index store it made Linux read a ring's worth of stale used
elements, "id N is not a head!".)
"""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from evmm.devices.virtio.queue import QueueConfig, Virtqueue
from evmm.memory import GuestMemory
from tests.fakes.virtio_driver import Allocator, DriverQueue, new_memory

WATCHER = r"""
#include <pthread.h>
#include <sched.h>
#include <stdint.h>

struct watch {
    uint16_t *field;
    int cpu;
    volatile int stop;
    uint64_t changes, backwards;
    pthread_t thread;
};

static void *watch_run(void *arg)
{
    struct watch *w = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    uint16_t last = __atomic_load_n(w->field, __ATOMIC_RELAXED);
    while (!w->stop) {
        /* One 16-bit load, as the driver's READ_ONCE. */
        uint16_t v = __atomic_load_n(w->field, __ATOMIC_RELAXED);
        if (v != last) {
            w->changes++;
            w->backwards += v < last; /* a pass only counts up: see watch() */
            last = v;
        }
    }
    return 0;
}

int watch_start(struct watch *w) { return pthread_create(&w->thread, 0, watch_run, w); }
int watch_stop(struct watch *w) { w->stop = 1; return pthread_join(w->thread, 0); }
"""

CDEF = """
struct watch { uint16_t *field; int cpu; volatile int stop; uint64_t changes, backwards; ...; };
int watch_start(struct watch *w);
int watch_stop(struct watch *w);
"""

PASSES = 4  # over 1..65535 (a quarter of a million stores)
MAX_PASSES = 40  # while the watcher has seen fewer than MIN_CHANGES (a loaded machine), or for the control
MIN_CHANGES = 10_000


@pytest.fixture(scope="module")
def watcher(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    cffi = pytest.importorskip("cffi")
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("_ring_watch", WATCHER, extra_link_args=["-pthread"])
    build = tmp_path_factory.mktemp("watch")
    so = ffi.compile(tmpdir=str(build), verbose=False)
    spec = importlib.util.spec_from_file_location("_ring_watch", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def two_cpus() -> Iterator[tuple[int, int]]:
    """This thread pinned to one CPU, and another CPU for the watcher; restored afterwards."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: the watcher must run beside the writer, not between its stores")
    os.sched_setaffinity(0, {cpus[0]})
    try:
        yield cpus[0], cpus[1]
    finally:
        os.sched_setaffinity(0, set(cpus))


def watch(module: ModuleType, field: memoryview, cpu: int, store: Callable[[int], None]) -> tuple[int, int]:
    """One pass: ``field`` set to 0, then ``store(v)`` for v = 1, 2, ... 65535 while a C thread on ``cpu``
    polls it; (changes it saw, how many were steps down).  A pass never wraps, so however long the watcher
    is descheduled, every value it reads should be at least the one before."""
    ffi, lib = module.ffi, module.lib
    field[0] = field[1] = 0
    keep = ffi.from_buffer(field)
    w: Any = ffi.new("struct watch *")
    w.field = ffi.cast("uint16_t *", keep)
    w.cpu = cpu
    assert lib.watch_start(w) == 0
    try:
        for v in range(1, 0x10000):
            store(v)
    finally:
        assert lib.watch_stop(w) == 0
    return int(w.changes), int(w.backwards)


def observe(module: ModuleType, field: memoryview, cpu: int, store: Callable[[int], None]) -> tuple[int, int]:
    """PASSES passes, more while the watcher has seen fewer than MIN_CHANGES (it shares the machine);
    (changes seen, steps down) over all of them."""
    changes = backwards = 0
    for i in range(MAX_PASSES):
        if i >= PASSES and changes >= MIN_CHANGES:
            break
        c, b = watch(module, field, cpu, store)
        changes, backwards = changes + c, backwards + b
    # The watcher ran beside the stores (else the caller's check proves nothing).
    assert changes >= MIN_CHANGES, f"the watcher saw only {changes} changes: it did not run alongside"
    return changes, backwards


def queue(mem: GuestMemory) -> tuple[DriverQueue, Virtqueue]:
    dq = DriverQueue(mem, 0x10000, 256, Allocator())
    return dq, Virtqueue(0, QueueConfig(256, dq.desc, dq.avail, dq.used, True), mem, event_idx=True)


def used_index(mem: GuestMemory) -> tuple[memoryview, Callable[[int], None]]:
    dq, vq = queue(mem)

    def publish(v: int) -> None:
        vq.next_used = v
        vq.publish_used()

    return mem.view(dq.used + 2, 2), publish


def avail_event(mem: GuestMemory) -> tuple[memoryview, Callable[[int], None]]:
    dq, vq = queue(mem)

    def request_kick(v: int) -> None:
        vq.next_avail = v
        vq.set_notification(True)

    return mem.view(dq.used + 4 + 8 * 256, 2), request_kick  # avail_event follows the used ring (§2.7.8)


def write_u16(mem: GuestMemory) -> tuple[memoryview, Callable[[int], None]]:
    addr = 0x20002
    return mem.view(addr, 2), lambda v: mem.write_u16(addr, v)


@pytest.mark.parametrize("field", [used_index, avail_event, write_u16])
def test_a_field_the_guest_reads_never_steps_back(
    watcher: ModuleType,
    two_cpus: tuple[int, int],
    field: Callable[[GuestMemory], tuple[memoryview, Callable[[int], None]]],
) -> None:
    view, store = field(new_memory())
    changes, backwards = observe(watcher, view, two_cpus[1], store)
    assert backwards == 0, f"{field.__name__} went backwards {backwards} times in {changes} changes"


def test_the_watcher_sees_a_store_that_passes_through_zero(
    watcher: ModuleType, two_cpus: tuple[int, int]
) -> None:
    # The check above can fail: struct.pack_into on the same field is caught at it.  A pass shows it ~20
    # times on an idle machine; a loaded one may need more.
    mem = new_memory()
    view, _ = write_u16(mem)
    u16 = struct.Struct("<H")
    seen = 0
    for _ in range(MAX_PASSES):
        changes, backwards = watch(watcher, view, two_cpus[1], lambda v: u16.pack_into(view, 0, v))
        seen += changes
        if backwards:
            return
    pytest.fail(f"struct.pack_into never went backwards in {seen} changes over {MAX_PASSES} passes")
