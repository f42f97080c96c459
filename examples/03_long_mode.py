"""03: 64-bit long mode: page tables, a GDT, and EFER - what a Linux kernel expects at its entry.

    python examples/03_long_mode.py

Long mode needs paging (SDM Vol. 3A, 9.8.5): the VMM writes identity-mapping page tables into guest
memory (pykvm.x86.paging: PML4 -> PDPT -> page directories with 2 MiB pages), a GDT with a 64-bit
code segment, and sets CR3, CR4.PAE, EFER.LME/LMA and CR0.PG|PE (pykvm.x86.cpu.setup_long_mode).
The guest computes 20! with 64-bit multiplies - too big for 32 bits - and prints it in decimal.
"""

from pykvm.devices.debugcon import DebugCon
from pykvm.machine import Machine
from pykvm.x86 import cpu, paging

CODE_AT = 0x100000      # 1 MiB, like a Linux kernel
CODE = bytes([
    0xb8, 1, 0, 0, 0,                   # mov eax, 1
    0xb9, 20, 0, 0, 0,                  # mov ecx, 20
    # fact: imul rax, rcx ; loop fact
    0x48, 0x0f, 0xaf, 0xc1,             # imul rax, rcx
    0xe2, 0xfa,                         # loop fact          ; rax = 20! = 2432902008176640000
    # print rax in decimal: push digits on the stack, then pop and out them
    0xbb, 10, 0, 0, 0,                  # mov ebx, 10
    0x31, 0xc9,                         # xor ecx, ecx       ; digit count
    # digits: xor edx,edx ; div rbx ; add dl,'0' ; push rdx ; inc ecx ; test rax,rax ; jnz digits
    0x31, 0xd2, 0x48, 0xf7, 0xf3, 0x80, 0xc2, 0x30, 0x52, 0xff, 0xc1, 0x48, 0x85, 0xc0, 0x75, 0xf0,
    # print: pop rax ; out 0xe9, al ; loop print
    0x58, 0xe6, 0xe9, 0xe2, 0xfb,
    0xb0, 0x0a, 0xe6, 0xe9,             # mov al, '\n' ; out 0xe9, al
    0xf4,                               # hlt
])

with Machine(4 << 20, irqchip="none") as m:
    out = bytearray()
    m.add_pio(0xe9, 1, DebugCon(out.extend))
    m.mem.write(CODE_AT, CODE)
    cr3 = paging.write_identity_map(m.mem)          # page tables in low memory
    cpu.setup_long_mode(m.vcpu, m.mem, entry=CODE_AT, cr3=cr3)
    stop = m.run(timeout=60)
    sregs = m.vcpu.get_sregs()
    print("20! =", out.decode(), end="")
    print(f"CS.L={sregs.cs.l} (64-bit code)  EFER={sregs.efer:#x}  CR0={sregs.cr0:#x}  "
          f"CR4={sregs.cr4:#x}  stopped: {stop.reason}")
