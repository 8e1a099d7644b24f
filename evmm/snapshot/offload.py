"""One blocking job of a snapshot, run on an I/O worker and awaited on the reactor.

Writing guest memory to a file (and fsync) takes seconds for a large guest; on the reactor it would stall
the control channel, the consoles and vsock for all that time.  The job runs on an ``IoWorkers`` thread
(the block and file devices' pool, so it wears the ``io`` seccomp role) and its result comes back through
that pool's eventfd, which the reactor watches only while the job runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from evmm.devices.virtio.blk.backend import IoWorkers

T = TypeVar("T")


def _raised(e: BaseException) -> BaseException:
    return e


async def on_worker(job: Callable[[], T], name: str) -> T:
    """Run ``job`` on a new I/O worker thread; its result, or the exception it raised, comes back here.

    Cancelling the caller does not stop the job: the thread finishes it and is let go then (a job that
    writes a temporary file must not have it removed under it).
    """
    loop = asyncio.get_running_loop()
    workers: IoWorkers[T | BaseException] = IoWorkers(1, name, _raised)
    done: asyncio.Future[T | BaseException] = loop.create_future()

    def collected() -> None:
        results = workers.collect()
        if not results:
            return
        loop.remove_reader(workers.fd)
        workers.close()  # the thread has finished its one job: it leaves at once
        if not done.done():
            done.set_result(results[0][1])

    loop.add_reader(workers.fd, collected)
    workers.submit(0, job)
    result = await done
    if isinstance(result, BaseException):
        raise result
    return result


__all__ = ["on_worker"]
