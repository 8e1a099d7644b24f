"""cffi builder for evmm's io_uring binding (API mode), compiled against the host's <linux/io_uring.h>.

No liburing: a few dozen lines of C set up one ring with raw syscalls (io_uring_setup(2), io_uring_enter(2),
io_uring_register(2)), queue READV, WRITEV and FSYNC entries and reap completions, with the ring's head and
tail moved by acquire/release atomics as io_uring(7) prescribes.  Python sees a handle and plain integers;
only evmm/uring/ imports the result.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

CDEF = r"""
struct iovec { void *iov_base; size_t iov_len; ...; };
struct evmm_uring;

/* A ring of at least ``entries`` entries whose completions also signal ``eventfd`` (-1: none); NULL with
   *err set to the errno when the kernel refuses (ENOSYS, EPERM: io_uring disabled, ENOMEM: locked memory). */
struct evmm_uring *evmm_uring_new(unsigned entries, int eventfd, int *err);
unsigned evmm_uring_entries(struct evmm_uring *r);
/* Queue one request (not yet submitted): 0, or -EBUSY when the submission queue is full. */
int evmm_uring_rw(struct evmm_uring *r, int write, int fd, const struct iovec *iov, unsigned nr,
                  uint64_t offset, uint64_t user_data);
int evmm_uring_fsync(struct evmm_uring *r, int fd, int datasync, uint64_t user_data);
/* Submit everything queued, and with min_complete > 0 wait for that many completions: >= 0, or -errno. */
int evmm_uring_submit(struct evmm_uring *r, unsigned min_complete);
/* Up to ``max`` completions: their user_data and res (bytes, or -errno); how many. */
unsigned evmm_uring_reap(struct evmm_uring *r, uint64_t *user_data, int32_t *res, unsigned max);
void evmm_uring_free(struct evmm_uring *r);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>

struct evmm_uring {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ring, *cq_ring;
    size_t sq_ring_size, cq_ring_size, sqes_size;
    unsigned queued;  /* entries published in the SQ ring and not yet given to io_uring_enter */
};

static void *map_ring(int fd, size_t size, uint64_t offset)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

void evmm_uring_free(struct evmm_uring *r)
{
    if (r == NULL)
        return;
    if (r->sqes != NULL)
        munmap(r->sqes, r->sqes_size);
    if (r->cq_ring != NULL && r->cq_ring != r->sq_ring)
        munmap(r->cq_ring, r->cq_ring_size);
    if (r->sq_ring != NULL)
        munmap(r->sq_ring, r->sq_ring_size);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

struct evmm_uring *evmm_uring_new(unsigned entries, int eventfd, int *err)
{
    struct io_uring_params p;
    struct evmm_uring *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) {
        *err = errno;
        free(r);
        return NULL;
    }
    r->entries = p.sq_entries;
    r->sq_ring_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_ring_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_ring_size > r->sq_ring_size)
            r->sq_ring_size = r->cq_ring_size;
        r->cq_ring_size = r->sq_ring_size;
    }
    r->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sq_ring = map_ring(r->fd, r->sq_ring_size, IORING_OFF_SQ_RING);
    if (r->sq_ring != NULL)
        r->cq_ring = (p.features & IORING_FEAT_SINGLE_MMAP) ? r->sq_ring
                                                             : map_ring(r->fd, r->cq_ring_size, IORING_OFF_CQ_RING);
    if (r->cq_ring != NULL)
        r->sqes = map_ring(r->fd, r->sqes_size, IORING_OFF_SQES);
    if (r->sqes == NULL) {
        *err = errno;
        evmm_uring_free(r);
        return NULL;
    }
    char *sq = r->sq_ring, *cq = r->cq_ring;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    if (eventfd >= 0 && syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_EVENTFD, &eventfd, 1) < 0) {
        *err = errno;
        evmm_uring_free(r);
        return NULL;
    }
    return r;
}

unsigned evmm_uring_entries(struct evmm_uring *r)
{
    return r->entries;
}

/* The next free submission entry, zeroed, or NULL when the kernel has not consumed enough yet. */
static struct io_uring_sqe *next_sqe(struct evmm_uring *r)
{
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    unsigned tail = *r->sq_tail;  /* only this side writes it */
    if (tail - head >= r->entries)
        return NULL;
    unsigned i = tail & *r->sq_mask;
    memset(&r->sqes[i], 0, sizeof(r->sqes[i]));
    r->sq_array[i] = i;
    return &r->sqes[i];
}

/* The entry is filled: move the tail past it, after every store to it (io_uring(7): a release store). */
static void publish(struct evmm_uring *r)
{
    __atomic_store_n(r->sq_tail, *r->sq_tail + 1, __ATOMIC_RELEASE);
    r->queued++;
}

int evmm_uring_rw(struct evmm_uring *r, int write, int fd, const struct iovec *iov, unsigned nr,
                  uint64_t offset, uint64_t user_data)
{
    struct io_uring_sqe *sqe = next_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    sqe->opcode = write ? IORING_OP_WRITEV : IORING_OP_READV;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)iov;
    sqe->len = nr;
    sqe->off = offset;
    sqe->user_data = user_data;
    publish(r);
    return 0;
}

int evmm_uring_fsync(struct evmm_uring *r, int fd, int datasync, uint64_t user_data)
{
    struct io_uring_sqe *sqe = next_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fd = fd;
    sqe->fsync_flags = datasync ? IORING_FSYNC_DATASYNC : 0;
    sqe->user_data = user_data;
    publish(r);
    return 0;
}

int evmm_uring_submit(struct evmm_uring *r, unsigned min_complete)
{
    unsigned flags = min_complete ? IORING_ENTER_GETEVENTS : 0;
    if (r->queued == 0 && min_complete == 0)
        return 0;
    for (;;) {
        long n = syscall(__NR_io_uring_enter, r->fd, r->queued, min_complete, flags, NULL, 0);
        if (n >= 0) {
            r->queued -= (unsigned)n;
            return (int)n;
        }
        if (errno != EINTR)
            return -errno;
    }
}

unsigned evmm_uring_reap(struct evmm_uring *r, uint64_t *user_data, int32_t *res, unsigned max)
{
    unsigned head = *r->cq_head;  /* only this side writes it */
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    unsigned n = 0;
    while (head != tail && n < max) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
        head++;
    }
    /* The entries are read: the kernel may reuse them (a release store). */
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return n;
}
"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source("evmm.uring._uring_ffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
