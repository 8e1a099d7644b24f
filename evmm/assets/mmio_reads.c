/* evmm-mmio-reads: time N 32-bit loads from one MMIO register, as a guest program sees them.
 *
 *   evmm-mmio-reads ADDR COUNT
 *
 * Maps the page of physical address ADDR through /dev/mem (read() of /dev/mem stops at the end of RAM on
 * x86, mmap does not: drivers/char/mem.c, valid_phys_addr_range) and loads the 32-bit register at ADDR
 * COUNT times.  Every load of device memory is an MMIO exit to the VMM, so the mean is one exit's round
 * trip as the guest waits for it.  Prints "evmm-mmio-reads: COUNT reads, NS ns each" (CLOCK_MONOTONIC).
 * Static, so the initramfs needs no libc.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ULL

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: evmm-mmio-reads ADDR COUNT\n");
        return 2;
    }
    uint64_t addr = strtoull(argv[1], NULL, 0);
    unsigned long count = strtoul(argv[2], NULL, 0);
    if (addr % 4 != 0 || count == 0) {
        fprintf(stderr, "evmm-mmio-reads: ADDR must be 4-byte aligned and COUNT positive\n");
        return 2;
    }
    int fd = open("/dev/mem", O_RDONLY | O_SYNC);
    if (fd < 0) {
        perror("evmm-mmio-reads: /dev/mem");
        return 1;
    }
    uint8_t *page = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, (off_t)(addr & ~(PAGE - 1)));
    if (page == MAP_FAILED) {
        perror("evmm-mmio-reads: mmap");
        return 1;
    }
    volatile uint32_t *reg = (volatile uint32_t *)(page + (addr & (PAGE - 1)));
    uint32_t sink = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (unsigned long i = 0; i < count; i++)
        sink ^= *reg;
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
    printf("evmm-mmio-reads: %lu reads, %.0f ns each (xor %u)\n", count, ns / (double)count, sink);
    return 0;
}
