/* checksum: a compute loop that reports its progress, for snapshot tests (tests/test_snapshot.py).

   Runs `rounds` rounds of `n` steps of an xorshift64 generator, folding every value into a sum,
   and prints "round R sum S" after each round and "checksum S" at the end (exit status 0). The
   sum depends on every step in order, so a run saved in the middle and restored elsewhere ends
   with the right checksum only if every register and every byte of RAM came back.

   State lives in registers and in a small table in RAM (`mix`), which every step reads and
   writes: RAM, not only registers, must survive a snapshot.

   args: arg0 rounds (8), arg1 steps per round (2,000,000). */
#include "fw.h"

static uint64_t mix[64];

int main(void)
{
    uint64_t rounds = fw_arg(0, 8), n = fw_arg(1, 2000000);
    uint64_t x = 0x9E3779B97F4A7C15ull, sum = 0;

    for (unsigned i = 0; i < 64; i++)
        mix[i] = i * 0x100000001B3ull;
    for (uint64_t r = 0; r < rounds; r++) {
        for (uint64_t i = 0; i < n; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            mix[x & 63] += x;
            sum = (sum ^ mix[(x >> 6) & 63]) * 0x100000001B3ull + i;
        }
        fw_printf("round %lu sum %lx\n", r, sum);
    }
    fw_printf("checksum %lx\n", sum);
    return 0;
}
