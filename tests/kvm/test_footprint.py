"""What an idle ``evmm run`` loads, natively: a spinning stand-in kernel on the host's /dev/kvm.

The VMM's steady memory is mostly the interpreter and what it imports (docs/performance.md, "Where the
memory goes"); these libraries are what the run path was cut loose from, each worth a few hundred KiB to
4 MiB, and a new import can bring them back unnoticed.  The overhead itself is ``evmm bench``'s to measure.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.unit.test_bootparams import fake_bzimage

ROOT = Path(__file__).resolve().parents[2]
# 0x200 bytes in, the 64-bit entry point of a bzImage's protected-mode code (Linux boot protocol): jmp $.
SPIN_KERNEL = fake_bzimage(payload=b"\x90" * 0x200 + b"\xeb\xfe" + b"\x90" * 4096)
# Mapped files that must not be: OpenSSL (ssl, hashlib), ctypes, datetime, uuid.
ABSENT = ("libssl", "libcrypto", "_ssl.", "_hashlib.", "_ctypes.", "_datetime.", "_uuid.")


def test_an_idle_microvm_maps_no_openssl_ctypes_datetime_or_uuid(tmp_path: Path) -> None:
    kernel = tmp_path / "spin.bzImage"
    kernel.write_bytes(SPIN_KERNEL)
    argv = [sys.executable, "-m", "evmm", "run", "-v", "--allow-slow-kvm", "--memory", "128M"]
    p = subprocess.Popen(
        [*argv, "--kernel", str(kernel)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert p.stderr is not None
        err, deadline = b"", time.monotonic() + 60
        while b"start-up:" not in err and p.poll() is None and time.monotonic() < deadline:
            if select.select([p.stderr], [], [], 1)[0]:
                err += os.read(p.stderr.fileno(), 4096)
        assert b"start-up:" in err, f"evmm's vCPU did not run: {err.decode(errors='replace')}"
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        threads = {
            Path(f"/proc/{p.pid}/task/{tid}/comm").read_text().strip()
            for tid in os.listdir(f"/proc/{p.pid}/task")
        }
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    files = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    assert [f for f in files if any(name in os.path.basename(f) for name in ABSENT)] == []
    assert any("_kvm_ffi" in f for f in files) and any("uvloop" in f for f in files)  # the VMM was loaded
    assert "evmm-vcpu0" in threads  # named through /proc/thread-self/comm
