/* compress: LZ77 compression throughput in the guest, the "gzip" row of the 2007 benchmark
 * (bench/kernels/lz_kernel.c, the same source bench/native_compress.c runs on the host).
 *
 * args: arg0 guest-physical (= virtual) address of the work area (default 16 MiB), arg1 input
 *       bytes (default 1 MiB), arg2 repetitions (default 3; the first is a warm-up).
 * The machine needs arg0 + lz_memory_needed(arg1) bytes of RAM (about 3 x arg1 + 400 KiB).
 * General registers only: no SSE needed.
 *
 * Output, parsed by bench/compute.py (native_compress prints the same):
 *   lz in=<bytes> out=<compressed bytes> compress=<best ticks> decompress=<best ticks>
 *      fingerprint=<FNV-1a of the compressed stream> ok=<1 if the round trip gave the input back>
 *   lz total_ticks=<TSC ticks main() took>
 * Exit status 0 if the round trip worked, else 1. */
#include "fw.h"
#include "../bench/kernels/lz_kernel.c"

int main(void)
{
    uint64_t base = fw_arg(0, 16u << 20), n = fw_arg(1, 1u << 20), reps = fw_arg(2, 3);
    struct lz_result r;
    uint64_t t_start = bench_rdtsc();

    fw_printf("lz n=%lu reps=%lu base=%lx cpl=%u\n", n, reps, base, fw_cpl());
    lz_run((void *)base, n, (unsigned)reps, &r);
    fw_printf("lz in=%lu out=%lu compress=%lu decompress=%lu fingerprint=%lx ok=%u\n", r.in_bytes,
              r.out_bytes, r.compress_best, r.decompress_best, r.fingerprint, (unsigned)r.ok);
    fw_printf("lz total_ticks=%lu\n", bench_rdtsc() - t_start);
    return r.ok ? 0 : 1;
}
