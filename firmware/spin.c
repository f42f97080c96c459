/* spin: count in a loop until the host (or a debugger) sets `release`, then exit 0x2a.
 *
 * The loop makes no exits, so at CPL3 on a KVM-PVM host it runs natively: a gdb Ctrl-C (a kick
 * of the vCPU) stops it in user mode, where gdb can read and write its variables
 * (tests/test_gdb.py, examples/07_gdb.py). */
#include "fw.h"

volatile uint64_t spins;
volatile uint32_t release;

int main(void)
{
    while (!release)
        spins++;
    fw_printf("spin: released after %lu spins at CPL%u\n", (unsigned long)spins, fw_cpl());
    return 0x2a;
}
