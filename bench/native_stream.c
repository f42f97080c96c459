/* native_stream: bench/kernels/stream_kernel.c on the host, the baseline for firmware/stream.
 *
 *   native_stream ELEMENTS REPS WHICH HUGEPAGES
 *
 * Built by bench/compute.py with the firmware's gcc flags (minus -ffreestanding/-nostdlib), so the
 * kernel compiles to the same code as in the guest. The arrays are one anonymous MAP_PRIVATE
 * mapping, 2 MiB-aligned, with MADV_HUGEPAGE if HUGEPAGES is 1 - what pykvm.memory.MmapBackend
 * gives guest RAM. Prints the firmware's lines, then "tsc_hz=<TSC ticks per second>" measured
 * against CLOCK_MONOTONIC. Integer arithmetic only in this file (it is built without SSE). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include "native_common.h"
#include "kernels/stream_kernel.c"

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: native_stream ELEMENTS REPS WHICH HUGEPAGES\n");
        return 2;
    }
    uint64_t n = strtoull(argv[1], 0, 0), reps = strtoull(argv[2], 0, 0);
    unsigned which = (unsigned)strtoul(argv[3], 0, 0);
    void *base = native_alloc(3 * n * 8, atoi(argv[4]));
    struct stream_result r;

    printf("stream n=%llu reps=%llu cpl=native\n", (unsigned long long)n, (unsigned long long)reps);
    stream_run(base, n, (unsigned)reps, which, &r);
    for (unsigned k = 0; k < STREAM_KERNELS; k++)
        if (r.best[k])
            printf("stream %s ticks=%llu bytes=%llu\n", stream_names[k],
                   (unsigned long long)r.best[k], (unsigned long long)r.bytes[k]);
    printf("stream ok=%u\n", r.ok);
    printf("tsc_hz=%llu\n", (unsigned long long)native_tsc_hz());
    printf("native_thp_kib=%lld\n", native_thp_kib());
    return r.ok == which ? 0 : 1;
}
