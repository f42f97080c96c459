/* bench_kernel.h - what the shared benchmark kernels (stream_kernel.c, lz_kernel.c) need.
 *
 * The kernels are compiled twice from the same source: into a firmware program (firmware/stream.c,
 * firmware/compress.c: freestanding, run at CPL3 in a pykvm guest) and into a host program
 * (bench/native_stream.c, bench/native_compress.c), with the firmware's gcc flags
 * (pykvm.testing.firmware.CFLAGS) in both, minus -ffreestanding/-nostdlib. So they use no library
 * function at all - not even the memcpy/memset gcc likes to turn loops into (the firmware runtime's
 * are byte loops, glibc's are tuned: either would make the comparison about libraries, not about
 * virtualization). The pragma below stops gcc from recognising those loops; bench/compute.py
 * checks the compiled kernels for undefined symbols.
 *
 * Time is the TSC: `rdtsc` at CPL3 is allowed unless CR4.TSD is set, and the firmware runtime never
 * sets it. Under KVM the guest's TSC ticks at the host's rate (no TSC scaling is configured), so
 * guest and native tick counts compare directly; bench/compute.py turns ticks into seconds with a
 * TSC frequency the native program measures against CLOCK_MONOTONIC.
 */
#ifndef BENCH_KERNEL_H
#define BENCH_KERNEL_H
#include <stdint.h>

#pragma GCC optimize("no-tree-loop-distribute-patterns")

/* Reads of the TSC, ordered after the instructions before them (lfence: AMD's and Intel's
 * recommended serialisation for rdtsc timing). */
static inline uint64_t bench_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence\n\trdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

/* 64-bit FNV-1a over a buffer: a fingerprint the host compares between guest and native runs. */
static inline uint64_t bench_fnv1a(const uint8_t *p, uint64_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* xorshift64*: the deterministic data generator. */
static inline uint64_t bench_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}
#endif
