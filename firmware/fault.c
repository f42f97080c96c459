/* fault: raise a CPU exception on purpose, to check that the runtime reports it.
 *
 * args: arg[0] which one: 0 #UD (ud2, vector 6, the default), 1 #PF (a read beyond the identity
 * map, vector 14), 2 #GP (a read at a non-canonical address, vector 13), 3 #DE (divide by zero,
 * vector 0), 4 #BP (int3, vector 3: at CPL0 a KVM-PVM host cannot emulate it, so run with
 * run_firmware(..., complete_pvm_gaps=True) there). The runtime's handler prints "fw: exception <vector> ..." and exits with status
 * 0x1000 | vector; reaching the end of main is a failure (status 1). */
#include "fw.h"

int main(void)
{
    uint64_t which = fw_arg(0, 0);
    fw_printf("fault: raising exception kind %lu at CPL%u\n", which, fw_cpl());
    switch (which) {
    case 0:
        __asm__ volatile("ud2");
        break;
    case 1:
        (void)*(volatile uint64_t *)0x8000000000ull;       /* PML4 entry 1: not present */
        break;
    case 2:
        (void)*(volatile uint64_t *)0x8000000000000000ull; /* non-canonical */
        break;
    case 3: {
        volatile uint32_t zero = 0;
        uint32_t q, r;
        __asm__ volatile("divl %2" : "=a"(q), "=d"(r) : "r"(zero), "a"(1), "d"(0));
        (void)q, (void)r;
        break;
    }
    case 4:
        __asm__ volatile("int3");
        break;
    default:
        fw_printf("fault: unknown kind %lu\n", which);
        return 2;
    }
    fw_printf("fault: no exception was raised\n");
    return 1;
}
