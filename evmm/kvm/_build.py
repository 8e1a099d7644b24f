"""cffi builder for evmm's KVM bindings (API mode).

Compiled at install time against the host's ``<linux/kvm.h>`` (Debian: linux-libc-dev), so every struct layout
and ioctl number comes from the real header: the ``...`` in the declarations below asks the C compiler for the
true offsets and values instead of trusting hand-written ones.  Only ``evmm/kvm/`` imports the result.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

CDEF = r"""
/* ---- ioctl numbers and constants: values come from <linux/kvm.h> ---- */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_IOEVENTFD ...
#define KVM_IRQFD ...
#define KVM_IRQ_LINE ...
#define KVM_SIGNAL_MSI ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_TSC_KHZ ...
#define KVM_KVMCLOCK_CTRL ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_TSC_CONTROL ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_PIT_STATE2 ...
#define KVM_CAP_SYNC_MMU ...
#define KVM_CAP_IOEVENTFD_ANY_LENGTH ...
#define KVM_CAP_X86_SMM ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_INTERNAL_ERROR_EMULATION ...

#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MEM_READONLY ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_NR_INTERRUPTS ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX ...

/* ---- snapshot and restore (evmm/kvm/state.py) ---- */
#define KVM_GET_XSAVE2 ...
#define KVM_CAP_XSAVE2 ...
#define KVM_CAP_KVMCLOCK_CTRL ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_VCPUEVENT_VALID_NMI_PENDING ...
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR ...

/* Offset of the big exit union inside struct kvm_run (io, mmio, internal, system_event, ... overlay it). */
#define EVMM_RUN_EXIT_UNION_OFFSET ...

/* ---- structures (fields by name; the compiler fixes offsets and sizes) ---- */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    unsigned long long interrupt_bitmap[4];  /* __u64 arrays: spelled as the header does */
};
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx;
    uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp;
    uint8_t xmm[16][16]; uint32_t mxcsr;
    ...;
};
struct kvm_msr_entry { uint32_t index; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_userspace_memory_region {
    uint32_t slot, flags; uint64_t guest_phys_addr, memory_size, userspace_addr;
};
struct kvm_ioeventfd {
    uint64_t datamatch, addr; uint32_t len; int32_t fd; uint32_t flags;
    ...;
};
struct kvm_irqfd { uint32_t fd, gsi, flags, resamplefd; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_msi { uint32_t address_lo, address_hi, data, flags, devid; ...; };
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
struct kvm_irq_routing_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; ...; };
typedef union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; ...; } evmm_routing_u;
struct kvm_irq_routing_entry { uint32_t gsi; uint32_t type; uint32_t flags; evmm_routing_u u; ...; };
struct kvm_irq_routing { uint32_t nr; uint32_t flags; struct kvm_irq_routing_entry entries[]; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; uint64_t realtime; uint64_t host_tsc; ...; };
struct kvm_enable_cap { uint32_t cap; uint32_t flags; unsigned long long args[4]; ...; };
/* State blobs, saved and restored whole (snapshots); only the fields evmm adjusts are named. */
struct kvm_vcpu_events { uint32_t sipi_vector; uint32_t flags; ...; };
struct kvm_xsave { ...; };
struct kvm_xcrs { ...; };
struct kvm_debugregs { ...; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { ...; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};
/* Named views of the anonymous union in struct kvm_run (see evmm_kvm.h below). */
typedef struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; ...; } evmm_exit_fail_entry;
typedef struct { uint64_t hardware_exit_reason; ...; } evmm_exit_hw;
typedef struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; ...; }
    evmm_exit_io;
typedef struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; ...; } evmm_exit_mmio;
typedef struct { uint32_t suberror; uint32_t ndata; unsigned long long data[16]; ...; } evmm_exit_internal;
typedef struct { uint32_t type; uint32_t ndata; ...; } evmm_exit_system_event;

/* ioctl wrappers: return the ioctl's result, or -errno (so errno never crosses threads). */
int evmm_ioctl(int fd, unsigned long request, void *arg);
int evmm_ioctl_val(int fd, unsigned long request, unsigned long arg);
/* A full memory barrier (mfence on x86): orders a store before a later load, which x86 alone does not. */
void evmm_full_barrier(void);

/* The 16550A's fast path (evmm/kvm/uart_fast.py): an opaque state shared by vCPU threads and the model. */
typedef struct evmm_uart evmm_uart;
evmm_uart *evmm_uart_new(uint16_t base, int wake_fd, uint32_t capacity);
void evmm_uart_free(evmm_uart *u);
void evmm_uart_set(evmm_uart *u, int thr_fast, int lsr_fast, uint8_t lsr);
void evmm_uart_put(evmm_uart *u, const uint8_t *data, size_t n);
size_t evmm_uart_take(evmm_uart *u, uint8_t *out, size_t max);
uint64_t evmm_uart_dropped(evmm_uart *u);
int evmm_uart_try(evmm_uart *u, int is_out, uint16_t port, uint8_t *data);
int evmm_run_fast(int fd, struct kvm_run *run, evmm_uart *u, uint64_t *fast_exits);
"""

SOURCE = r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define EVMM_RUN_EXIT_UNION_OFFSET offsetof(struct kvm_run, io)

/* The exit union in struct kvm_run is anonymous; typeof names its members so cffi can check their layout. */
typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) evmm_routing_u;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) evmm_exit_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->hw) evmm_exit_hw;
typedef __typeof__(((struct kvm_run *)0)->io) evmm_exit_io;
typedef __typeof__(((struct kvm_run *)0)->mmio) evmm_exit_mmio;
typedef __typeof__(((struct kvm_run *)0)->internal) evmm_exit_internal;
typedef __typeof__(((struct kvm_run *)0)->system_event) evmm_exit_system_event;

int evmm_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int evmm_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

void evmm_full_barrier(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/*
 * The 16550A fast path.  Linux's serial console writes a byte as "read LSR until THRE, write THR": two
 * port-I/O exits per byte, each costing the Python model a few microseconds natively and ~150 us inside the
 * KVM test host (QEMU TCG), which made a verbose boot several times slower than QEMU's.  This loop answers
 * exactly those two accesses in C, without the GIL, when the model (evmm/devices/legacy/serial.py) has said
 * they have no effect beyond what is done here:
 *   - a THR write when thr_fast: DLAB clear, no loopback, and the interrupt line cannot change (THRE
 *     interrupts disabled, or a THRE interrupt already pending).  The byte joins the output ring.  Writing
 *     THR clears a pending THRE and the byte leaves at once, so THRE is pending again (16550A datasheet,
 *     Table IV): the model's state is the same after as before, or differs only in a THRE-pending flag
 *     that THRE interrupts being disabled make unobservable (enabling them sets it anyway).
 *   - an LSR read when lsr_fast: no error bits for the read to clear, so the answer is the model's lsr.
 * Every other exit goes back to Python as before.  One mutex orders this against the model's updates.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EVMM_UART_THR 0
#define EVMM_UART_LSR 5

typedef struct evmm_uart evmm_uart;
struct evmm_uart {
    pthread_mutex_t lock;
    uint16_t base;
    int wake_fd;            /* eventfd written when the ring goes from empty to non-empty; -1: none */
    int thr_fast, lsr_fast;
    uint8_t lsr;
    uint32_t capacity, head, len;
    uint64_t dropped;
    uint8_t *ring;
};

evmm_uart *evmm_uart_new(uint16_t base, int wake_fd, uint32_t capacity)
{
    evmm_uart *u = calloc(1, sizeof(*u));
    if (u == NULL)
        return NULL;
    u->ring = malloc(capacity);
    if (u->ring == NULL) {
        free(u);
        return NULL;
    }
    pthread_mutex_init(&u->lock, NULL);
    u->base = base;
    u->wake_fd = wake_fd;
    u->capacity = capacity;
    return u;
}

void evmm_uart_free(evmm_uart *u)
{
    if (u == NULL)
        return;
    pthread_mutex_destroy(&u->lock);
    free(u->ring);
    free(u);
}

void evmm_uart_set(evmm_uart *u, int thr_fast, int lsr_fast, uint8_t lsr)
{
    pthread_mutex_lock(&u->lock);
    u->thr_fast = thr_fast;
    u->lsr_fast = lsr_fast;
    u->lsr = lsr;
    pthread_mutex_unlock(&u->lock);
}

static void evmm_uart_put_locked(evmm_uart *u, const uint8_t *data, size_t n)
{
    int was_empty = u->len == 0;
    for (size_t i = 0; i < n; i++) {
        if (u->len == u->capacity) {   /* nobody is taking: a stalled reader must not stall the guest */
            u->dropped += n - i;
            break;
        }
        u->ring[(u->head + u->len) % u->capacity] = data[i];
        u->len++;
    }
    if (was_empty && u->len && u->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(u->wake_fd, &one, sizeof(one));
        (void)w;  /* EAGAIN: the counter is already non-zero, the reader is awake anyway */
    }
}

void evmm_uart_put(evmm_uart *u, const uint8_t *data, size_t n)
{
    pthread_mutex_lock(&u->lock);
    evmm_uart_put_locked(u, data, n);
    pthread_mutex_unlock(&u->lock);
}

size_t evmm_uart_take(evmm_uart *u, uint8_t *out, size_t max)
{
    pthread_mutex_lock(&u->lock);
    size_t n = u->len < max ? u->len : max;
    for (size_t i = 0; i < n; i++)
        out[i] = u->ring[(u->head + i) % u->capacity];
    u->head = (u->head + n) % u->capacity;
    u->len -= n;
    pthread_mutex_unlock(&u->lock);
    return n;
}

uint64_t evmm_uart_dropped(evmm_uart *u)
{
    pthread_mutex_lock(&u->lock);
    uint64_t d = u->dropped;
    pthread_mutex_unlock(&u->lock);
    return d;
}

/* One port-I/O access of one byte: 1 if taken here (an IN's answer is in *data), 0 if it is Python's. */
int evmm_uart_try(evmm_uart *u, int is_out, uint16_t port, uint8_t *data)
{
    int taken = 0;
    pthread_mutex_lock(&u->lock);
    if (is_out && port == u->base + EVMM_UART_THR && u->thr_fast) {
        evmm_uart_put_locked(u, data, 1);
        taken = 1;
    } else if (!is_out && port == u->base + EVMM_UART_LSR && u->lsr_fast) {
        *data = u->lsr;
        taken = 1;
    }
    pthread_mutex_unlock(&u->lock);
    return taken;
}

/* KVM_RUN until an exit the fast path does not take; returns that KVM_RUN's result or -errno. */
int evmm_run_fast(int fd, struct kvm_run *run, evmm_uart *u, uint64_t *fast_exits)
{
    for (;;) {
        int r = ioctl(fd, KVM_RUN, 0);
        if (r < 0)
            return -errno;
        if (u == NULL || run->exit_reason != KVM_EXIT_IO || run->io.size != 1 || run->io.count != 1)
            return r;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (!evmm_uart_try(u, run->io.direction == KVM_EXIT_IO_OUT, run->io.port, data))
            return r;
        (*fast_exits)++;
    }
}"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source("evmm.kvm._kvm_ffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
