/* evmm-hostile: a hostile virtio-mmio driver, run as root inside a guest (the tools initramfs), to check that
 * a guest poking a device's registers and writing garbage rings costs at most that device.
 *
 *   evmm-hostile BASE ROUNDS SEED
 *
 * BASE is the physical address of a virtio-mmio register window (virtio 1.2 §4.2.2) whose guest driver has
 * been unbound (so the kernel lets /dev/mem map it and no driver fights over it).  Each round does one of:
 * a register write with a random or boundary value, a register read, an in-order bring-up with rings in
 * pages this program owns (physical addresses from /proc/self/pagemap) or at hostile addresses (past RAM,
 * unaligned, zero), garbage in those rings followed by a QueueNotify, or garbage in config space.  It ends
 * with a reset (STATUS 0) and prints "evmm-hostile: N rounds".  Static, so the initramfs needs no libc.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define WINDOW 0x200
#define PAGES 8
#define PAGE 4096

static volatile uint32_t *regs;
static uint64_t state;
static uint64_t phys[PAGES];
static uint8_t *pages;

static uint64_t next(void)
{
    /* xorshift64*: reproducible from SEED */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1DULL;
}

static void w(unsigned off, uint32_t v) { regs[off / 4] = v; }
static uint32_t r(unsigned off) { return regs[off / 4]; }

static uint32_t value(void)
{
    static const uint32_t boundary[] = { 0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x8000, 0xffff, 0x10000,
                                         0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff };
    return (next() & 1) ? boundary[next() % (sizeof boundary / sizeof boundary[0])] : (uint32_t)next();
}

static uint64_t ring_address(int which)
{
    static const uint64_t hostile[] = { 0, 0xfff, 0xfeb00000, 0xd0000000, 0x100000000ULL, 0xffffffffffff0000ULL };
    switch (next() % 4) {
    case 0:
        return hostile[next() % (sizeof hostile / sizeof hostile[0])];
    case 1:
        return phys[which % PAGES] + (next() % PAGE);  /* ours, unaligned */
    default:
        return phys[which % PAGES];
    }
}

static void bring_up(void)
{
    w(0x070, 0);
    w(0x070, 1);
    w(0x070, 3);
    w(0x024, 1);
    w(0x020, 1); /* VIRTIO_F_VERSION_1 (bit 32) */
    w(0x024, 0);
    w(0x020, (uint32_t)next());
    w(0x070, 0xb);
    for (unsigned q = 0; q < 1 + next() % 3; q++) {
        w(0x030, (next() % 8) ? q : value());
        w(0x038, (next() % 4) ? 1u << (next() % 9) : value());
        uint64_t a[3] = { ring_address(3 * q), ring_address(3 * q + 1), ring_address(3 * q + 2) };
        static const unsigned lo[3] = { 0x080, 0x090, 0x0a0 };
        for (int i = 0; i < 3; i++) {
            w(lo[i], (uint32_t)a[i]);
            w(lo[i] + 4, (uint32_t)(a[i] >> 32));
        }
        w(0x044, (next() % 8) ? 1 : value());
    }
    w(0x070, (next() % 8) ? 0xf : value());
}

static void garbage_rings(void)
{
    unsigned page = next() % PAGES;
    for (unsigned i = 0; i < 1 + next() % 64; i++) {
        uint64_t v = next();
        memcpy(pages + page * PAGE + (next() % (PAGE - 8)), &v, 8);
    }
    if (next() & 1) { /* a plausible avail index ahead of the device */
        uint16_t idx = (uint16_t)value();
        memcpy(pages + page * PAGE + 2, &idx, 2);
    }
    __sync_synchronize();
    w(0x050, (next() % 4) ? next() % 3 : value());
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: evmm-hostile BASE ROUNDS SEED\n");
        return 2;
    }
    uint64_t base = strtoull(argv[1], NULL, 0);
    unsigned long rounds = strtoul(argv[2], NULL, 0);
    state = strtoull(argv[3], NULL, 0) | 1;

    int mem = open("/dev/mem", O_RDWR | O_SYNC);
    if (mem < 0) {
        perror("evmm-hostile: /dev/mem");
        return 1;
    }
    void *win = mmap(NULL, WINDOW, PROT_READ | PROT_WRITE, MAP_SHARED, mem, (off_t)base);
    if (win == MAP_FAILED) {
        perror("evmm-hostile: mmap /dev/mem");
        return 1;
    }
    regs = win;
    if (r(0x000) != 0x74726976) {
        fprintf(stderr, "evmm-hostile: no virtio-mmio magic at %#llx\n", (unsigned long long)base);
        return 1;
    }
    pages = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
    if (pages == MAP_FAILED) {
        perror("evmm-hostile: mmap");
        return 1;
    }
    memset(pages, 0, PAGES * PAGE);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    for (int i = 0; i < PAGES; i++) {
        uint64_t entry = 0;
        if (pm < 0 || pread(pm, &entry, 8, (off_t)(((uintptr_t)pages / PAGE + i) * 8)) != 8 || !(entry >> 63)) {
            fprintf(stderr, "evmm-hostile: no physical address for page %d (run as root)\n", i);
            return 1;
        }
        phys[i] = (entry & ((1ULL << 55) - 1)) * PAGE;
    }
    unsigned long reads = 0;
    for (unsigned long n = 0; n < rounds; n++) {
        switch (next() % 6) {
        case 0:
            w((unsigned)(next() % WINDOW) & ~3u, value());
            break;
        case 1:
            reads += r((unsigned)(next() % WINDOW) & ~3u) != 0;
            break;
        case 2:
            bring_up();
            break;
        case 3:
        case 4:
            garbage_rings();
            break;
        default:
            w(0x100 + (unsigned)(next() % 0x100 & ~3u), value());
            break;
        }
    }
    w(0x070, 0);
    printf("evmm-hostile: %lu rounds (%lu non-zero reads)\n", rounds, reads);
    return 0;
}
