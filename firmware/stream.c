/* stream: memory bandwidth in the guest - STREAM's copy, scale, add and triad on uint64_t and on
 * double (bench/kernels/stream_kernel.c, the same source bench/native_stream.c runs on the host).
 *
 * args: arg0 guest-physical (= virtual: the runtime identity-maps the first 1 GiB) address of the
 *       three arrays (default 16 MiB), arg1 elements per array (default 65536), arg2 repetitions
 *       (default 4; the first is a warm-up), arg3 which: bit 0 integer, bit 1 double (default 3).
 * The machine needs arg0 + 3 * arg1 * 8 bytes of RAM.
 *
 * The double loops use SSE2, which needs CR4.OSFXSR (else #UD). The runtime leaves CR4 alone and
 * main() runs at CPL3, where CR4 cannot be written, so we ask the VMM: one byte to port 0xFC
 * (bench/compute.py's EnableSse sets CR4.OSFXSR|OSXMMEXCPT and CR0.MP, clears CR0.EM, as an OS
 * does at boot). A VMM without that device leaves CR4 as it is.
 *
 * Output, one line per loop that ran, parsed by bench/compute.py (native_stream prints the same):
 *   stream <name> ticks=<best TSC ticks of one pass> bytes=<bytes one pass moves>
 *   stream ok=<which bits whose arrays checked out> total_ticks=<TSC ticks main() took>
 * (the host checks total_ticks against its own clock: a guest TSC running at another rate than
 * the host's would show there)
 * Exit status 0 if every requested kind checked out, else 1. */
#include "fw.h"
#include "../bench/kernels/stream_kernel.c"

#define PORT_ENABLE_SSE 0xfc

int main(void)
{
    uint64_t base = fw_arg(0, 16u << 20), n = fw_arg(1, 65536), reps = fw_arg(2, 4);
    unsigned which = (unsigned)fw_arg(3, STREAM_INT | STREAM_FP);
    struct stream_result r;
    uint64_t t_start = bench_rdtsc();

    if (which & STREAM_FP)
        outb(PORT_ENABLE_SSE, 1);
    fw_printf("stream n=%lu reps=%lu base=%lx cpl=%u\n", n, reps, base, fw_cpl());
    stream_run((void *)base, n, (unsigned)reps, which, &r);
    for (unsigned k = 0; k < STREAM_KERNELS; k++)
        if (r.best[k])
            fw_printf("stream %s ticks=%lu bytes=%lu\n", stream_names[k], r.best[k], r.bytes[k]);
    fw_printf("stream ok=%u total_ticks=%lu\n", r.ok, bench_rdtsc() - t_start);
    return r.ok == which ? 0 : 1;
}
