"""What kind of KVM this host offers, and whether it can boot Linux.

A PVM-based ``/dev/kvm`` (module ``kvm_pvm``) runs guest ring-3 code natively but emulates ring-0 code about
4000x slower, so no Linux guest boots on it; evmm then points users at the KVM test host.  ``evmm doctor``
adds a timed probe; this module only reads what the kernel tells us, so it is cheap enough for every start.
"""

from __future__ import annotations

import os
from pathlib import Path

from evmm.record import record


@record(frozen=True)
class HostKvm:
    present: bool  # /dev/kvm exists and can be opened read-write
    module: str  # kvm_intel, kvm_amd, kvm_pvm, or "" when unknown
    can_boot_linux: bool
    reason: str  # one line: why Linux can or cannot boot here


def _loaded_module(sysfs: Path) -> str:
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if (sysfs / "module" / name).is_dir():
            return name
    return ""


def probe(dev: str = "/dev/kvm", sysfs: str = "/sys") -> HostKvm:
    module = _loaded_module(Path(sysfs))
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return HostKvm(
            False, module, False, f"{dev} does not exist (no KVM on this host, or its module is not loaded)"
        )
    except PermissionError:
        return HostKvm(
            False, module, False, f"{dev} is not accessible to this user (add yourself to group kvm)"
        )
    except OSError as e:
        return HostKvm(False, module, False, f"cannot open {dev}: {e.strerror}")
    os.close(fd)
    if module == "kvm_pvm":
        return HostKvm(
            True,
            module,
            False,
            f"{dev} is PVM-based (kvm_pvm): guest ring-0 code is emulated ~4000x slower, so Linux cannot boot on it",
        )
    return HostKvm(True, module, True, f"{dev} is hardware-backed ({module or 'unknown module'})")
