/* tlb_reach: how many pages the guest's TLB reaches, seen as the latency of a pointer chase.
 *
 * A chain of pointers visits every 4 KiB page of a buffer once, in a random order (a random cyclic
 * permutation), each pointer at its own cache line within its page. The lines fit in the caches
 * (one 64-byte line per page: 512 KiB for 32 MiB), the pages do not fit in the TLB when they are
 * 4 KiB pages (8192 pages against an L2 TLB of 1-3 thousand entries), and do easily when they are
 * 2 MiB pages (16). So the ticks per load say which page size the hardware really walks: on a
 * shadow-paging host (KVM-PVM) that is neither the guest's page size nor the host's alone but the
 * smaller of the two, and only if KVM may map the guest's large page with the host's
 * (bench/tlb_reach.py runs it on differently backed guest RAM; pykvm/memory.py says why).
 *
 * args: arg0 buffer address (default 16 MiB), arg1 bytes (default 32 MiB, a multiple of 4 KiB),
 *       arg2 loads per pass (default 4M), arg3 passes (default 4; the best counts, the first
 *       also touches every page).
 * Output: "tlb bytes=N pages=P loads=L best=T" (T: TSC ticks of the best pass). Exit 0.
 * The page tables map with 2 MiB pages (firmware/runtime/entry.S), so the guest side is large.
 */
#include "fw.h"

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return (uint64_t)hi << 32 | lo;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static inline uint64_t next_rand(void)
{
    rng ^= rng << 13; /* xorshift64 */
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* The line used in page p: spread over the page so the lines do not crowd a few cache sets. */
static inline uint64_t line_of(uint64_t p) { return (p * 7 % 64) * 64; }

int main(void)
{
    uint8_t *buf = (uint8_t *)fw_arg(0, 16u << 20);
    uint64_t bytes = fw_arg(1, 32u << 20), loads = fw_arg(2, 4u << 20), passes = fw_arg(3, 4);
    uint64_t pages = bytes / 4096;
    if (pages < 2 || passes < 1) {
        fw_printf("tlb: FAIL bad arguments\n");
        return 1;
    }
    /* Sattolo's algorithm over an index array kept in the pages themselves (the second line of
     * each page): a random cycle through all pages. */
    uint64_t *idx = 0;
    for (uint64_t p = 0; p < pages; p++) {
        idx = (uint64_t *)(buf + p * 4096 + (line_of(p) + 64) % 4096);
        *idx = p;
    }
    for (uint64_t i = pages - 1; i > 0; i--) {
        uint64_t j = next_rand() % i;
        uint64_t *a = (uint64_t *)(buf + i * 4096 + (line_of(i) + 64) % 4096);
        uint64_t *b = (uint64_t *)(buf + j * 4096 + (line_of(j) + 64) % 4096);
        uint64_t t = *a;
        *a = *b;
        *b = t;
    }
    /* Link page order[k] -> order[k+1]. */
    for (uint64_t k = 0; k < pages; k++) {
        uint64_t from = *(uint64_t *)(buf + k * 4096 + (line_of(k) + 64) % 4096);
        uint64_t kn = (k + 1) % pages;
        uint64_t to = *(uint64_t *)(buf + kn * 4096 + (line_of(kn) + 64) % 4096);
        *(uint64_t *)(buf + from * 4096 + line_of(from)) = (uint64_t)(buf + to * 4096 + line_of(to));
    }
    uint64_t best = ~0ull;
    void *p = buf + line_of(0);
    for (uint64_t pass = 0; pass < passes; pass++) {
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; i < loads; i++)
            p = *(void **)p;
        uint64_t t = rdtsc() - t0;
        if (t < best)
            best = t;
    }
    fw_printf("tlb bytes=%lu pages=%lu loads=%lu best=%lu end=%lx\n", bytes, pages, loads, best,
              (uint64_t)p);
    return 0;
}
