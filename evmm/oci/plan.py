"""From a container's spec to its microVM and its first process: pure, so every mapping is unit-tested.

The guest sees the bundle's rootfs and each bind mount's source over virtio-fs, one share each, mounted by
the guest side at ``SHARES/TAG`` (evmm/oci/sandbox_guest.py); the agent then makes the container's mount
namespace from ``CONTAINER_ROOT`` (a bind of the rootfs share) with the spec's mounts, as runc does before
pivot_root.  A bind of a single file (docker's /etc/hosts, /etc/resolv.conf) shares the file's directory
read-only and binds the one file from it: virtio-fs shares directories.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from evmm.errors import EvmmError
from evmm.oci.guest import ProcessRequest, Share, VmPlan
from evmm.oci.spec import ContainerSpec, Mount, ProcessSpec

SHARES = PurePosixPath("/run/evmm-oci/shares")  # in the guest
ROOTFS_TAG = "rootfs"
KERNEL_ANNOTATION = "io.evmm.oci.kernel"
INITRD_ANNOTATION = "io.evmm.oci.initrd"
APPEND_ANNOTATION = "io.evmm.oci.append"
# Mount types the guest kernel makes itself; "bind" mounts come from the host over virtio-fs.
GUEST_FS = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2")
# The agent's namespaces for the container's first process: network stays the VM's own (the VM is the
# container's network namespace on the host side); cgroup: the guest's tree is the container's already.
AGENT_NAMESPACES = {"pid": "pid", "mount": "mount", "ipc": "ipc", "uts": "uts"}


def is_bind(m: Mount) -> bool:
    """A bind mount: type "bind", or no type (or "none") with a bind option (config.md "Mounts")."""
    return m.type == "bind" or (
        m.type in (None, "", "none") and any(o in ("bind", "rbind") for o in m.options)
    )


def vm_plan(
    spec: ContainerSpec, *, kernel: Path | None = None, initrd: Path | None = None
) -> tuple[VmPlan, list[dict[str, Any]]]:
    """The VM for ``spec`` (without its network: see evmm/oci/network.py), and the agent's mount list for
    its first process.  ``kernel``/``initrd``: the runtime's own (``--kernel``/``--initrd``), which the
    bundle's annotations override; None for both: evmm's default guest."""
    shares = [Share(ROOTFS_TAG, spec.root, readonly=spec.readonly_root)]
    mounts: list[dict[str, Any]] = []
    for i, m in enumerate(spec.mounts):
        if is_bind(m):
            mounts.append(_bind(m, i, shares))
        elif m.type in GUEST_FS:
            # "cgroup": the guest's unified hierarchy, as runc mounts it on a cgroup v2 host.
            kind = "cgroup2" if m.type == "cgroup" else m.type
            mounts.append(
                {
                    "type": kind,
                    "source": m.source or kind,
                    "target": m.destination,
                    "options": list(m.options),
                }
            )
        else:
            raise EvmmError(f"mounts[{i}] {m.destination}: mount type {m.type!r} is not supported in a VM")
    notes = spec.annotation_map
    plan = VmPlan(
        memory=spec.memory,
        vcpus=spec.vcpus,
        kernel=_annotated_path(notes, KERNEL_ANNOTATION) or kernel,
        initrd=_annotated_path(notes, INITRD_ANNOTATION) or initrd,
        shares=tuple(shares),
        guest_setup=tuple(("sysctl", "-w", f"{k}={v}") for k, v in spec.sysctl),
        append=tuple(notes.get(APPEND_ANNOTATION, "").split()),
    )
    return plan, mounts


def _bind(m: Mount, index: int, shares: list[Share]) -> dict[str, Any]:
    if not m.source:
        raise EvmmError(f"mounts[{index}] {m.destination}: a bind mount without a source")
    source = Path(m.source)
    if not source.is_absolute():
        raise EvmmError(f"mounts[{index}] {m.destination}: bind source {m.source!r} is not absolute")
    readonly = "ro" in m.options
    options = [o for o in m.options if o not in ("bind", "rbind")]
    if source.is_dir():
        guest_source = SHARES / _share(shares, source, readonly, index)
    elif source.exists():
        # One file: its directory shared (read-only if the bind is), the file bound from there.  Docker's
        # /etc/hosts, /etc/hostname and /etc/resolv.conf come from one directory: one share serves them all.
        guest_source = SHARES / _share(shares, source.parent, readonly, index) / source.name
    else:
        raise EvmmError(f"mounts[{index}] {m.destination}: bind source {m.source} does not exist")
    return {
        "type": "bind",
        "source": str(guest_source),
        "target": m.destination,
        "options": ["rbind", *options],
    }


def _share(shares: list[Share], path: Path, readonly: bool, index: int) -> str:
    """The tag of the share of ``path`` with this access, added as ``mINDEX`` unless there is one already."""
    for share in shares[1:]:  # not the rootfs share: the container's root is bound on its own
        if share.path == path and share.readonly == readonly:
            return share.tag
    shares.append(Share(f"m{index}", path, readonly=readonly))
    return f"m{index}"


def _annotated_path(notes: dict[str, str], key: str) -> Path | None:
    value = notes.get(key)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise EvmmError(f"annotation {key}={value}: no such file")
    return path


def first_process(spec: ContainerSpec, mounts: list[dict[str, Any]], *, stdin: bool) -> ProcessRequest:
    """The agent's exec request for the container's process (the ``container`` map makes the container)."""
    if spec.process is None:
        raise EvmmError("config.json has no process to run")
    namespaces = [AGENT_NAMESPACES[n.type] for n in spec.namespaces if n.type in AGENT_NAMESPACES]
    container = {
        "rootfs": str(SHARES / ROOTFS_TAG),
        "mounts": mounts,
        "hostname": spec.hostname,
        "namespaces": namespaces,
        "readonly_root": spec.readonly_root,
    }
    return process_request(spec.process, stdin=stdin, container=container)


def process_request(
    p: ProcessSpec, *, stdin: bool, container: dict[str, Any] | None = None, join: bool = False
) -> ProcessRequest:
    rows, cols = p.console_size or (24, 80)
    return ProcessRequest(
        argv=p.args,
        env=p.env,
        cwd=p.cwd,
        uid=p.uid,
        gid=p.gid,
        groups=p.additional_gids,
        umask=p.umask,
        rlimits=tuple((r.type, r.soft, r.hard) for r in p.rlimits),
        tty=p.terminal,
        rows=rows,
        cols=cols,
        stdin=stdin or p.terminal,
        container=container,
        join=join,
    )
