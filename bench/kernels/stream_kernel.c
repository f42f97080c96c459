/* stream_kernel.c - memory bandwidth the way STREAM (McCalpin) and RAMspeed's INTmem/FLOATmem
 * measure it: four loops over three arrays too large for the caches.
 *
 *   copy   c[i] = a[i]              2 x 8 bytes moved per element
 *   scale  b[i] = q * c[i]          2 x 8
 *   add    c[i] = a[i] + b[i]       3 x 8
 *   triad  a[i] = b[i] + q * c[i]   3 x 8
 *
 * once on uint64_t elements (general registers: RAMspeed's INTmem) and once on doubles (SSE2:
 * FLOATmem, STREAM). As in STREAM, bytes count what the loop reads and writes (not the
 * write-allocate fills), each loop is timed by itself, the first repetition is a warm-up and the
 * best of the others is reported, and the arrays are checked afterwards against the same
 * arithmetic done on scalars.
 *
 * Included by firmware/stream.c (guest, CPL3) and bench/native_stream.c (host); see
 * bench_kernel.h for why the same source and flags. The firmware is built with
 * -mgeneral-regs-only; the double loops ask for SSE2 per function (target attribute), which in the
 * guest needs CR4.OSFXSR - firmware/stream.c asks the VMM for it (bench/compute.py).
 */
#include "bench_kernel.h"

#define STREAM_KERNELS 8
#define STREAM_INT 1u /* `which` bits */
#define STREAM_FP 2u
#define STREAM_Q 3

static const char *const stream_names[STREAM_KERNELS] = {
    "int copy", "int scale", "int add", "int triad",
    "fp copy", "fp scale", "fp add", "fp triad",
};
static const unsigned stream_words[4] = {2, 2, 3, 3}; /* 8-byte words moved per element */

struct stream_result {
    uint64_t best[STREAM_KERNELS];  /* fewest TSC ticks of one pass, 0 if not run */
    uint64_t bytes[STREAM_KERNELS]; /* bytes one pass moves */
    unsigned ok;                    /* `which` bits whose arrays checked out */
};

/* ---- integer loops (general registers) ---- */
__attribute__((noinline)) static void int_copy(uint64_t *restrict c, const uint64_t *restrict a, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        c[i] = a[i];
}
__attribute__((noinline)) static void int_scale(uint64_t *restrict b, const uint64_t *restrict c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        b[i] = STREAM_Q * c[i];
}
__attribute__((noinline)) static void int_add(uint64_t *restrict c, const uint64_t *restrict a,
                                              const uint64_t *restrict b, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        c[i] = a[i] + b[i];
}
__attribute__((noinline)) static void int_triad(uint64_t *restrict a, const uint64_t *restrict b,
                                                const uint64_t *restrict c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        a[i] = b[i] + STREAM_Q * c[i];
}

/* ---- double loops (SSE2) ---- */
#define SSE2 __attribute__((noinline, target("sse2")))
SSE2 static void fp_init(double *a, double *b, double *c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        a[i] = 1.0;
        b[i] = 2.0;
        c[i] = 0.0;
    }
}
SSE2 static void fp_copy(double *restrict c, const double *restrict a, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        c[i] = a[i];
}
SSE2 static void fp_scale(double *restrict b, const double *restrict c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        b[i] = STREAM_Q * c[i];
}
SSE2 static void fp_add(double *restrict c, const double *restrict a, const double *restrict b, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        c[i] = a[i] + b[i];
}
SSE2 static void fp_triad(double *restrict a, const double *restrict b, const double *restrict c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        a[i] = b[i] + STREAM_Q * c[i];
}
/* STREAM's checkSTREAMresults, exactly: the loops do the same IEEE operations on every element as
 * this does on one scalar, so the arrays must hold these values bit for bit. */
SSE2 static int fp_check(const double *a, const double *b, const double *c, uint64_t n, unsigned reps)
{
    double aj = 1.0, bj = 2.0, cj = 0.0;
    for (unsigned r = 0; r < reps; r++) {
        cj = aj;
        bj = STREAM_Q * cj;
        cj = aj + bj;
        aj = bj + STREAM_Q * cj;
    }
    for (uint64_t i = 0; i < n; i++)
        if (a[i] != aj || b[i] != bj || c[i] != cj)
            return 0;
    return 1;
}

static int int_check(const uint64_t *a, const uint64_t *b, const uint64_t *c, uint64_t n, unsigned reps)
{
    uint64_t aj = 1, bj = 2, cj = 0;
    for (unsigned r = 0; r < reps; r++) {
        cj = aj;
        bj = STREAM_Q * cj;
        cj = aj + bj;
        aj = bj + STREAM_Q * cj;
    }
    for (uint64_t i = 0; i < n; i++)
        if (a[i] != aj || b[i] != bj || c[i] != cj)
            return 0;
    return 1;
}

static void stream_keep_best(struct stream_result *r, unsigned k, unsigned rep, uint64_t ticks)
{
    if (rep == 0)
        return; /* warm-up pass: page faults, shadow page-table fills, cold TLB */
    if (r->best[k] == 0 || ticks < r->best[k])
        r->best[k] = ticks;
}

/* Run the loops `reps` times (at least 2) over three arrays of n elements starting at `base`
 * (3 * n * 8 bytes). */
static void stream_run(void *base, uint64_t n, unsigned reps, unsigned which, struct stream_result *r)
{
    uint64_t *ia = base, *ib = ia + n, *ic = ib + n;
    double *fa = base, *fb = fa + n, *fc = fb + n;
    if (reps < 2)
        reps = 2;
    for (unsigned k = 0; k < STREAM_KERNELS; k++) {
        r->best[k] = 0;
        r->bytes[k] = stream_words[k % 4] * 8 * n;
    }
    r->ok = 0;
    if (which & STREAM_INT) {
        for (uint64_t i = 0; i < n; i++) {
            ia[i] = 1;
            ib[i] = 2;
            ic[i] = 0;
        }
        for (unsigned rep = 0; rep < reps; rep++) {
            uint64_t t0 = bench_rdtsc();
            int_copy(ic, ia, n);
            uint64_t t1 = bench_rdtsc();
            int_scale(ib, ic, n);
            uint64_t t2 = bench_rdtsc();
            int_add(ic, ia, ib, n);
            uint64_t t3 = bench_rdtsc();
            int_triad(ia, ib, ic, n);
            uint64_t t4 = bench_rdtsc();
            stream_keep_best(r, 0, rep, t1 - t0);
            stream_keep_best(r, 1, rep, t2 - t1);
            stream_keep_best(r, 2, rep, t3 - t2);
            stream_keep_best(r, 3, rep, t4 - t3);
        }
        if (int_check(ia, ib, ic, n, reps))
            r->ok |= STREAM_INT;
    }
    if (which & STREAM_FP) {
        fp_init(fa, fb, fc, n);
        for (unsigned rep = 0; rep < reps; rep++) {
            uint64_t t0 = bench_rdtsc();
            fp_copy(fc, fa, n);
            uint64_t t1 = bench_rdtsc();
            fp_scale(fb, fc, n);
            uint64_t t2 = bench_rdtsc();
            fp_add(fc, fa, fb, n);
            uint64_t t3 = bench_rdtsc();
            fp_triad(fa, fb, fc, n);
            uint64_t t4 = bench_rdtsc();
            stream_keep_best(r, 4, rep, t1 - t0);
            stream_keep_best(r, 5, rep, t2 - t1);
            stream_keep_best(r, 6, rep, t3 - t2);
            stream_keep_best(r, 7, rep, t4 - t3);
        }
        if (fp_check(fa, fb, fc, n, reps))
            r->ok |= STREAM_FP;
    }
}
