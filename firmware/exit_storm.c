/* exit_storm: N port writes in a tight loop - the guest half of the exit-cost benchmark
 * (bench/exit_cost.py) and of the tests that count exits.
 *
 * args: arg[0] iterations (default 1000), arg[1] port (default 0x80, the POST port).
 * The loop is three instructions (out, dec, jnz), so at CPL0 on a KVM-PVM host - where each
 * instruction is emulated - the loop itself adds a few microseconds per exit; at CPL3 it runs
 * natively and the round trip to the VMM is all there is. Exit status 0. */
#include "fw.h"

int main(void)
{
    uint64_t n = fw_arg(0, 1000);
    uint16_t port = (uint16_t)fw_arg(1, 0x80);
    fw_printf("exit_storm: %lu writes to port %x at CPL%u\n", n, port, fw_cpl());
    if (n)
        __asm__ volatile("1: outb %%al, %%dx\n\t"
                         "dec %%rcx\n\t"
                         "jnz 1b"
                         : "+c"(n)
                         : "a"(0), "d"(port)
                         : "memory", "cc");
    return 0;
}
