"""cffi builder for evmm's vhost bindings (API mode).

Compiled at install time against the host's ``<linux/vhost.h>`` (Debian: linux-libc-dev), so ioctl numbers and
the layouts of the structs they carry come from the real header: ``...`` asks the C compiler for the true
values and offsets.  A module of its own, not part of evmm/kvm's: vhost is host-kernel plumbing with its own
ioctls, not KVM, and a VMM that never asks for vhost never loads it.  Only ``evmm/vhost/`` imports the result.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

CDEF = r"""
/* ---- ioctl numbers: values come from <linux/vhost.h> ---- */
#define VHOST_GET_FEATURES ...
#define VHOST_SET_FEATURES ...
#define VHOST_SET_OWNER ...
#define VHOST_SET_MEM_TABLE ...
#define VHOST_SET_VRING_NUM ...
#define VHOST_SET_VRING_ADDR ...
#define VHOST_SET_VRING_BASE ...
#define VHOST_GET_VRING_BASE ...
#define VHOST_SET_VRING_KICK ...
#define VHOST_SET_VRING_CALL ...
#define VHOST_VSOCK_SET_GUEST_CID ...
#define VHOST_VSOCK_SET_RUNNING ...
#define VHOST_NET_SET_BACKEND ...
#define VHOST_FILE_UNBIND ...
#define VHOST_PAGE_SIZE ...

/* ---- structures (<linux/vhost_types.h>; fields by name, the compiler fixes offsets and sizes) ---- */
struct vhost_vring_state { unsigned int index; unsigned int num; ...; };
struct vhost_vring_file { unsigned int index; int fd; ...; };
struct vhost_vring_addr {
    unsigned int index; unsigned int flags;
    uint64_t desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr;
    ...;
};
struct vhost_memory_region { uint64_t guest_phys_addr, memory_size, userspace_addr, flags_padding; ...; };
struct vhost_memory { uint32_t nregions; uint32_t padding; struct vhost_memory_region regions[]; };

/* ioctl wrappers: return the ioctl's result, or -errno (so errno never crosses threads). */
int evmm_vhost_ioctl(int fd, unsigned long request, void *arg);
int evmm_vhost_ioctl_val(int fd, unsigned long request, unsigned long arg);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/vhost.h>

int evmm_vhost_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int evmm_vhost_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source("evmm.vhost._vhost_ffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
