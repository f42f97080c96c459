"""07: gdb attached to a guest - step through a firmware program from its first instruction.

    python examples/07_gdb.py

pykvm serves gdb's remote protocol (pykvm/gdb/). Here it holds the `hello` firmware before its
first instruction (real mode, CS:IP = 0:0x8000) and Debian's gdb, in batch mode, drives it:

1. `stepi` single-steps one instruction. KVM does the stepping: KVM_SET_GUEST_DEBUG with
   KVM_GUESTDBG_SINGLESTEP makes KVM_RUN return a `Debug` exit after each guest instruction,
   and the stub reports it to gdb as SIGTRAP.
2. `break main` plants an int3 (0xcc) at main while the guest runs; the exit it causes is a
   breakpoint hit (on a KVM-PVM host that exit is an emulation failure at the int3; in real mode
   there the stub single-steps to the breakpoint instead - pykvm/gdb/vcpus.py explains why).
3. At the stop, gdb reads registers (`g`: every register of the target description, control
   registers included) and memory by virtual address (the stub walks the guest's page tables
   with KVM_TRANSLATE), and `continue` lets the program run to its exit.
4. Then the same program again with main at CPL3 (user mode): a breakpoint and a step there. On
   a KVM-PVM host user-mode traps go to the guest's own IDT, not to KVM; the stub catches them at
   the entry of the guest's #BP/#DB handlers, which run emulated at CPL0, and unwinds the
   exception frame back to the user-mode address (pykvm/gdb/usertraps.py).

Run with `pykvm boot ... --gdb tcp::1234 --gdb-wait` and `gdb -ex 'target remote :1234'` to do the
same by hand with any guest.
"""

import sys

from pykvm.testing.gdb import debug_firmware, gdb_path

if gdb_path() is None:
    sys.exit("this example needs gdb (Debian: apt-get install gdb)")

commands = [
    "echo --- the first instruction, in real mode:\\n",
    "info registers rip cs cr0",
    "x/3i $pc",
    "stepi",
    "stepi",
    "echo --- two steps later:\\n",
    "info registers rip",
    "echo --- run to main (CPL0 here, in long mode with paging):\\n",
    "break main",
    "continue",
    "info registers rip cs cr0 cr3",
    "x/4i $pc",
    "echo --- main's first bytes, read through the guest's page tables (KVM_TRANSLATE):\\n",
    "p/x *(unsigned char (*)[8])$pc",
    "echo --- one source line further (next: steps, and runs over calls to a temporary breakpoint):\\n",
    "next",
    "info registers rip",
    "delete",
    "continue",
]
result, transcript = debug_firmware("hello", commands, cpl=0)
print(transcript)
print(f"the guest printed: {result.text.strip()!r}; exit status {result.status}")

user_mode = [
    "break main",
    "continue",
    "echo --- main at CPL3 (the low two bits of CS):\n",
    "p $cs & 3",
    "stepi",
    "echo --- one instruction later, still in user mode:\n",
    "info registers rip cs",
    "delete",
    "continue",
]
result, transcript = debug_firmware("hello", user_mode, cpl=3)
print(transcript)
print(f"the guest printed: {result.text.strip()!r}; exit status {result.status}")
