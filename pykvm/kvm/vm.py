"""`Vm`: a virtual machine's file descriptor (from KVM_CREATE_VM).

A VM owns guest-physical memory (memory *slots*), the in-kernel devices (interrupt controllers, PIT),
interrupt lines and the eventfd fast paths; vCPUs are created from it.
"""

from __future__ import annotations

import os

from ._lib import buffer_address, ffi, ioctl, ioctl_int, ioctl_new, lib

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing (pykvm/record.py)
if TYPE_CHECKING:
    from .vcpu import Vcpu



def host_address(buf) -> int:
    """The host virtual address of a writable buffer: guest RAM's mapping, as
    KVM_SET_USER_MEMORY_REGION's `userspace_addr` wants it (pykvm.memory asks through here)."""
    return buffer_address(buf)

class Vm:
    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        """Per-VM KVM_CHECK_EXTENSION (some answers differ from the system fd's)."""
        return ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    # ---- memory ----
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        """Map `size` bytes of our address space at `host_addr` into the guest at `gpa`.

        From then on the guest reads and writes that memory directly, with no exit. Size 0 deletes
        the slot."""
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, gpa: int) -> None:
        """Intel VT-x without "unrestricted guest" needs 3 pages of guest-physical space for a TSS
        KVM uses to run real mode in vm86; it must not be RAM or MMIO in use."""
        ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, gpa: int) -> None:
        """One page for the identity page table KVM uses on Intel for the same purpose."""
        addr = ffi.new("uint64_t *", gpa)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr, "KVM_SET_IDENTITY_MAP_ADDR")

    # ---- in-kernel devices and interrupts ----
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and a local APIC per vCPU. GSIs 0-15 go to
        both the PIC and the IOAPIC, 16-23 to the IOAPIC only."""
        ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 (needs the in-kernel irqchip). The PC speaker port
        0x61 stays with userspace (KVM_PIT_SPEAKER_DUMMY makes KVM answer it)."""
        cfg = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def get_irqchip(self, chip_id: int):
        """KVM_GET_IRQCHIP: the state of an in-kernel interrupt controller (a `struct kvm_irqchip *`)."""
        return ioctl_new(self.fd, "KVM_GET_IRQCHIP", "struct kvm_irqchip *", {"chip_id": chip_id})

    def set_irqchip(self, chip) -> None:
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def set_level_triggered(self, irq: int) -> None:
        """Mark ISA IRQ `irq` level-triggered in the in-kernel 8259's ELCR (ports 0x4d0/0x4d1), as a
        PC BIOS does for the IRQs it routes PCI INTx to: PCI interrupts are levels, shared, active
        until the device is serviced."""
        chip_id = lib.KVM_IRQCHIP_PIC_MASTER if irq < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
        chip = self.get_irqchip(chip_id)
        chip.chip.pic.elcr |= 1 << (irq & 7)
        self.set_irqchip(chip)

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive an input pin (GSI) of the in-kernel interrupt controllers."""
        lvl = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": 1 if level else 0})
        ioctl(self.fd, lib.KVM_IRQ_LINE, lvl, "KVM_IRQ_LINE")

    def irqfd(self, eventfd: int, gsi: int, resamplefd: int | None = None,
              deassign: bool = False) -> None:
        """KVM_IRQFD: a write to `eventfd` (from any thread, or the kernel) raises `gsi` without a
        trip through the VMM. With `resamplefd`, the line is level-triggered: KVM lowers it on EOI
        and signals `resamplefd` so the device can re-assert it if still pending."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        fields = {"fd": eventfd, "gsi": gsi, "flags": flags}
        if resamplefd is not None:
            fields["flags"] |= 1 << 1  # KVM_IRQFD_FLAG_RESAMPLE
            fields["resamplefd"] = resamplefd
        ioctl(self.fd, lib.KVM_IRQFD, ffi.new("struct kvm_irqfd *", fields), "KVM_IRQFD")

    def ioeventfd(self, eventfd: int, addr: int, length: int, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to `addr` signals `eventfd` and the guest goes on at once,
        with no exit to userspace (virtio queue notifications)."""
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        ev = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr,
                                                "len": length, "fd": eventfd, "flags": flags})
        ioctl(self.fd, lib.KVM_IOEVENTFD, ev, "KVM_IOEVENTFD")

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args) + [0] * (4 - len(args))})
        ioctl(self.fd, lib.KVM_ENABLE_CAP, ec, "KVM_ENABLE_CAP")

    def get_pit2(self):
        """KVM_GET_PIT2: the in-kernel i8254's three channels (counts, modes, latches, gates)."""
        return ioctl_new(self.fd, "KVM_GET_PIT2", "struct kvm_pit_state2 *")

    def set_pit2(self, pit) -> None:
        ioctl(self.fd, lib.KVM_SET_PIT2, pit, "KVM_SET_PIT2")

    # ---- clock ----
    def get_clock(self) -> int:
        """The guest's kvmclock time base in nanoseconds."""
        return self.get_clock_data().clock

    def get_clock_data(self):
        """KVM_GET_CLOCK as the struct: `clock` (ns) and `flags` (KVM_CLOCK_TSC_STABLE: the
        guest's clock follows the host TSC on every vCPU alike)."""
        return ioctl_new(self.fd, "KVM_GET_CLOCK", "struct kvm_clock_data *")

    def set_clock(self, ns: int) -> None:
        data = ffi.new("struct kvm_clock_data *", {"clock": ns})
        ioctl(self.fd, lib.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    # ---- vCPUs ----
    def create_vcpu(self, index: int | None = None) -> "Vcpu":
        from .vcpu import Vcpu
        index = len(self.vcpus) if index is None else index
        fd = ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, fd, index, self.kvm.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        return vcpu
