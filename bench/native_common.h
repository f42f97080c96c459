/* native_common.h - memory and TSC calibration for bench/native_*.c (host side only). */
#ifndef BENCH_NATIVE_COMMON_H
#define BENCH_NATIVE_COMMON_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include "kernels/bench_kernel.h"

#define NATIVE_ALIGN (2u << 20)

/* An anonymous private mapping, 2 MiB-aligned, as pykvm.memory.MmapBackend backs guest RAM. */
static void *native_alloc(uint64_t size, int hugepages)
{
    uint64_t len = size + NATIVE_ALIGN;
    uint8_t *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    uint8_t *a = (uint8_t *)(((uintptr_t)p + NATIVE_ALIGN - 1) & ~(uintptr_t)(NATIVE_ALIGN - 1));
    if (hugepages)
        madvise(a, size, MADV_HUGEPAGE);
    return a;
}

static uint64_t native_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* TSC ticks per second over a 100 ms busy wait (integer arithmetic: no SSE in these builds). */
static uint64_t native_tsc_hz(void)
{
    uint64_t n0 = native_ns(), t0 = bench_rdtsc(), n1;
    do
        n1 = native_ns();
    while (n1 - n0 < 100000000ull);
    uint64_t t1 = bench_rdtsc();
    return (t1 - t0) * 1000000000ull / (n1 - n0);
}

/* kB of this process's memory in transparent huge pages (/proc/self/smaps_rollup AnonHugePages),
 * or -1 if unknown: the host checks the native arrays got the backing the row says. */
static long long native_thp_kib(void)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long long kib = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %lld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}
#endif
