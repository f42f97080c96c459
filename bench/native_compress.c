/* native_compress: bench/kernels/lz_kernel.c on the host, the baseline for firmware/compress.
 *
 *   native_compress BYTES REPS HUGEPAGES
 *
 * Built and run by bench/compute.py like native_stream.c (same flags, same memory). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include "native_common.h"
#include "kernels/lz_kernel.c"

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: native_compress BYTES REPS HUGEPAGES\n");
        return 2;
    }
    uint64_t n = strtoull(argv[1], 0, 0), reps = strtoull(argv[2], 0, 0);
    void *base = native_alloc(lz_memory_needed(n), atoi(argv[3]));
    struct lz_result r;

    printf("lz n=%llu reps=%llu cpl=native\n", (unsigned long long)n, (unsigned long long)reps);
    lz_run(base, n, (unsigned)reps, &r);
    printf("lz in=%llu out=%llu compress=%llu decompress=%llu fingerprint=0x%llx ok=%u\n",
           (unsigned long long)r.in_bytes, (unsigned long long)r.out_bytes,
           (unsigned long long)r.compress_best, (unsigned long long)r.decompress_best,
           (unsigned long long)r.fingerprint, (unsigned)r.ok);
    printf("tsc_hz=%llu\n", (unsigned long long)native_tsc_hz());
    printf("native_thp_kib=%lld\n", native_thp_kib());
    return r.ok ? 0 : 1;
}
