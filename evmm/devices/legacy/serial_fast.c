/*
 * The 16550A's fast path (serial_fast.py): the two accesses Linux's serial console makes per byte, answered
 * on the vCPU thread without the GIL.
 *
 * Linux writes a console byte as "read LSR until THRE, write THR": two port-I/O exits per byte, each costing
 * the Python model a few microseconds natively and ~150 us inside the KVM test host (QEMU TCG), which made a
 * verbose boot several times slower than QEMU's.  evmm_uart_access answers exactly those two accesses when
 * the model (serial.py) has said they have no effect beyond what is done here:
 *   - a THR write when thr_fast: DLAB clear, no loopback, and the interrupt line cannot change (THRE
 *     interrupts disabled, or a THRE interrupt already pending).  The byte joins the output ring.  Writing
 *     THR clears a pending THRE and the byte leaves at once, so THRE is pending again (16550A datasheet,
 *     Table IV): the model's state is the same after as before, or differs only in a THRE-pending flag
 *     that THRE interrupts being disabled make unobservable (enabling them sets it anyway).
 *   - an LSR read when lsr_fast: no error bits for the read to clear, so the answer is the model's lsr.
 * Every other access is left to the model.  One mutex orders this against the model's updates.
 *
 * evmm_uart_access has the signature of evmm/kvm's exit hooks (evmm_access_fn in evmm/kvm/_build.py): the
 * vCPU's KVM_RUN loop calls it for every port-I/O exit inside the UART's eight ports, with the offset.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define EVMM_UART_THR 0
#define EVMM_UART_LSR 5

typedef struct evmm_uart evmm_uart;
struct evmm_uart {
    pthread_mutex_t lock;
    int wake_fd;            /* eventfd written when the ring goes from empty to non-empty; -1: none */
    int thr_fast, lsr_fast;
    uint8_t lsr;
    uint32_t capacity, head, len;
    uint64_t dropped;
    uint8_t *ring;
};

evmm_uart *evmm_uart_new(int wake_fd, uint32_t capacity)
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

/* One access at ``offset`` in the UART's ports: 1 if answered here (a read's byte is in *data), 0 if it is
 * the model's.  Only one-byte accesses: a wider one is split into byte cycles, which the model does. */
int evmm_uart_access(void *ctx, int is_write, uint64_t offset, uint32_t size, uint8_t *data)
{
    evmm_uart *u = ctx;
    int taken = 0;
    if (size != 1)
        return 0;
    pthread_mutex_lock(&u->lock);
    if (is_write && offset == EVMM_UART_THR && u->thr_fast) {
        evmm_uart_put_locked(u, data, 1);
        taken = 1;
    } else if (!is_write && offset == EVMM_UART_LSR && u->lsr_fast) {
        *data = u->lsr;
        taken = 1;
    }
    pthread_mutex_unlock(&u->lock);
    return taken;
}
