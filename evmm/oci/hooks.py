"""OCI hooks (config.md "POSIX-platform Hooks"), run on the host as runc runs them: the hook's ``path`` with
its ``args`` (args[0] is argv[0]) and ``env``, the container's state JSON on stdin, killed at its ``timeout``.

Docker needs them to network a container: its prestart hook (libnetwork-setkey) reads the state's pid and
moves the container's veth into that process's network namespace, which is the monitor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

from evmm.errors import EvmmError
from evmm.oci.spec import Hook

DEFAULT_TIMEOUT = 120.0  # seconds, where config.json gives none (runc waits without limit)


async def run(hook: Hook, state: dict[str, Any], kind: str) -> None:
    """Run one hook; ``EvmmError`` naming it when it fails, times out or cannot start."""
    argv = list(hook.args) or [hook.path]
    env = dict(item.partition("=")[::2] for item in hook.env)
    try:
        # argv[0] is args[0], not the path: docker's hook is /proc/PID/exe, dispatched on argv[0].
        proc = await asyncio.create_subprocess_exec(
            *argv,
            executable=hook.path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as e:
        raise EvmmError(f"{kind} hook {hook.path}: {e.strerror}") from None
    timeout = float(hook.timeout) if hook.timeout else DEFAULT_TIMEOUT
    try:
        _out, err = await asyncio.wait_for(proc.communicate(json.dumps(state).encode()), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise EvmmError(f"{kind} hook {hook.path} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip().splitlines()
        raise EvmmError(
            f"{kind} hook {hook.path} failed (exit status {proc.returncode})"
            + (f": {why[-1]}" if why else "")
        )


async def run_all(hooks: Sequence[Hook], state: dict[str, Any], kind: str) -> None:
    for hook in hooks:
        await run(hook, state, kind)
