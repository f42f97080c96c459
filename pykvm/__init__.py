"""pykvm: a virtual machine monitor in Python on Linux KVM.

How a VM comes to life, and where each step lives:

1. Open /dev/kvm and check the API version (`pykvm.kvm.Kvm`).
2. Create a VM (KVM_CREATE_VM) and give it RAM: host memory mapped by us and registered as memory
   slots (`pykvm.memory.GuestMemory`, `Vm.set_user_memory_region`).
3. Create the platform: an interrupt controller and timer (in-kernel, or our Python i8259/i8254), and
   devices on the port-I/O and MMIO buses (`pykvm.bus.Bus`, `pykvm.devices`, `pykvm.virtio`).
4. Create a vCPU (KVM_CREATE_VCPU), mmap its shared `kvm_run` page, and set its registers: real mode
   for a firmware program, or 64-bit long mode with page tables and a GDT for a Linux kernel
   (`pykvm.x86.cpu`, `pykvm.boot`).
5. Loop on KVM_RUN. Each return is an *exit*: the guest did something the hardware could not finish
   alone (an `out` to a port, a load from MMIO, `hlt`). `Vcpu.run()` turns it into a typed value
   (`pykvm.kvm.exits`), `pykvm.machine.handle_exit` dispatches it to the bus, and the loop goes on.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `from pykvm import LinuxVM, Machine` without making `import pykvm` load everything.
    if name == "LinuxVM":
        from .linux import LinuxVM
        return LinuxVM
    if name == "Machine":
        from .machine import Machine
        return Machine
    raise AttributeError(f"module 'pykvm' has no attribute {name!r}")


__all__ = ["LinuxVM", "Machine", "__version__"]
