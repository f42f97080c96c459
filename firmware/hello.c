/* hello: the smallest program - text on the debug console, exit status 0. */
#include "fw.h"

int main(void)
{
    fw_printf("Hello from pykvm firmware at CPL%u\n", fw_cpl());
    return 0;
}
