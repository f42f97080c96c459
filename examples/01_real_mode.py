"""01: the smallest VM - eight bytes of 16-bit real-mode code, straight on the KVM API.

    python examples/01_real_mode.py

Everything a VMM does, once, in order: open /dev/kvm, create a VM, give it memory, create a vCPU,
point it at our code, and run it until it exits. The guest adds two numbers and prints the result as
a digit on port 0xe9 (the "debug console" port Bochs and QEMU use), then halts.
"""

from pykvm.kvm import Kvm, exits
from pykvm.memory import MmapBackend

# The guest, assembled by hand (16-bit real mode):
CODE = bytes([
    0xb0, 0x02,        # mov al, 2
    0x04, 0x03,        # add al, 3
    0x04, ord("0"),    # add al, '0'     ; the digit '5'
    0xe6, 0xe9,        # out 0xe9, al    ; -> exit: IoOut(port=0xe9, size=1, count=1, data=b'5')
    0xf4,              # hlt             ; -> exit: Hlt
])
GUEST_ADDR = 0x1000

kvm = Kvm()                                   # open("/dev/kvm"), KVM_GET_API_VERSION == 12
vm = kvm.create_vm()                          # KVM_CREATE_VM -> a VM file descriptor

# Guest RAM is plain host memory: map 64 KiB and tell KVM it is guest-physical 0..64K (slot 0).
ram = MmapBackend(0x10000)
vm.set_user_memory_region(slot=0, gpa=0, size=0x10000, host_addr=ram.address())
ram.view()[GUEST_ADDR:GUEST_ADDR + len(CODE)] = CODE

vcpu = vm.create_vcpu()                       # KVM_CREATE_VCPU; its kvm_run page is mmap'ed for us

# A vCPU starts like a PC after reset: real mode, executing at CS:IP = F000:FFF0. Point it at our
# code instead. In real mode a segment's base is its selector * 16, so CS = 0, IP = 0x1000.
sregs = vcpu.get_sregs()                      # KVM_GET_SREGS: segment and control registers
sregs.cs.base, sregs.cs.selector = 0, 0
vcpu.set_sregs(sregs)
regs = vcpu.get_regs()                        # KVM_GET_REGS: general-purpose registers
regs.rip = GUEST_ADDR
regs.rflags = 0x2                             # bit 1 of RFLAGS is reserved and must be 1
vcpu.set_regs(regs)

# The run loop: each KVM_RUN returns at an exit, which vcpu.run() hands us as a typed value.
while True:
    exit = vcpu.run()
    print("exit:", exit)
    if isinstance(exit, exits.IoOut):
        print("  the guest says:", bytes(exit.data).decode())
    elif isinstance(exit, exits.Hlt):
        break

vm.close()
kvm.close()
