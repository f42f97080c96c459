"""05: a real guest program: C code built from firmware/, in long mode at CPL3.

    python examples/05_firmware.py [hello|modes|exit_storm|fault]

Writing machine code by hand stops being fun quickly. `firmware/` holds small freestanding C
programs and a runtime that walks the CPU from real mode to long mode and drops to user mode (CPL3),
checking itself at every stage. pykvm builds them with the machine's gcc, loads the ELF, and runs it;
the program prints on the debug port (0xe9) and ends by writing an exit status to port 0xf4.
"""

import sys

from pykvm.testing.firmware import run_firmware

name = sys.argv[1] if len(sys.argv) > 1 else "modes"
result = run_firmware(name, echo=lambda data: sys.stdout.write(data.decode(errors="replace")))
print(f"\n{name}: exit status {result.status:#x}, {sum(result.exits.values())} exits, "
      f"{result.seconds_in_run:.3f} s inside KVM_RUN")
