"""``evmm-oci features``: what this runtime supports, in the runtime spec's features document (features.md)."""

from __future__ import annotations

from typing import Any

from evmm.oci import plan, spec
from evmm.oci.state import OCI_VERSION

# Mount options the agent understands (its flag table; docs/agent-protocol.md "container").
MOUNT_OPTIONS = (
    "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "mand", "noatime",
    "nodev", "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime", "nosuid", "private",
    "rbind", "relatime", "remount", "ro", "rprivate", "rshared", "rslave", "runbindable", "rw", "shared",
    "silent", "slave", "strictatime", "suid", "sync", "unbindable",
)  # fmt: skip


def features() -> dict[str, Any]:
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": list(spec.HOOK_KINDS),
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {
            "namespaces": list(spec.HONOURED_NAMESPACES),
            "capabilities": [],
            "cgroup": {"v1": False, "v2": True, "systemd": True, "systemdUser": False},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.evmm.oci.vm": "one microVM per container",
            "io.evmm.oci.confined": "enforced by the VM boundary, not inside the guest: "
            + ", ".join(sorted(spec.CONFINED)),
            plan.KERNEL_ANNOTATION: "the guest kernel (a path)",
            plan.INITRD_ANNOTATION: "the guest initramfs (a path)",
            plan.APPEND_ANNOTATION: "extra guest kernel command line words",
            spec.STRICT_ANNOTATION: "true: refuse the confined fields instead of naming them in the log",
        },
    }
