"""A vCPU's and a VM's KVM state as plain values, for snapshots (pykvm/snapshot/).

Each piece is the kernel's own struct, kept as its raw bytes: the layout is the header's ABI
(<asm/kvm.h>), stable across kernels, and the sizes are checked on restore against this build's
(a snapshot from a kernel with a bigger XSAVE area, say, is refused rather than misread). MSRs are
a dict {index: value} over the list KVM reports (KVM_GET_MSR_INDEX_LIST).

Restore order matters (QEMU's kvm_arch_put_registers and Firecracker's vCPU restore agree on the
gist): special registers first (they hold EFER and the APIC base, which the LAPIC and MSR writes
depend on), then general registers, XCR0 before the XSAVE image it governs, the LAPIC, the MSRs
(TSC included: the guest's TSC continues from its saved value - except on KVM-PVM, which accepts
the write and keeps the host's TSC: docs/kvm-pvm.md), MP state, debug registers, and pending
events last (an exception or interrupt half-delivered when the VM stopped).

Measured on KVM-PVM (2026-12-02): every ioctl here works, get and set, with the in-kernel
irqchip; all 40 MSRs in the index list read back and are accepted.
"""

from __future__ import annotations

from ._lib import ffi, ioctl, lib
from .errors import KvmError

# The per-vCPU structs saved as bytes, in restore order (name, C type, getter, setter).
_VCPU_STRUCTS = (
    ("sregs", "struct kvm_sregs", "get_sregs", "set_sregs"),
    ("regs", "struct kvm_regs", "get_regs", "set_regs"),
    ("xcrs", "struct kvm_xcrs", "get_xcrs", "set_xcrs"),
    ("fpu", "struct kvm_fpu", "get_fpu", "set_fpu"),
)


def struct_sizes() -> dict[str, int]:
    """The sizes of every struct a snapshot keeps: part of what makes a host compatible."""
    names = [t for _, t, _, _ in _VCPU_STRUCTS] + [
        "struct kvm_xsave", "struct kvm_lapic_state", "struct kvm_debugregs",
        "struct kvm_vcpu_events", "struct kvm_irqchip", "struct kvm_pit_state2"]
    return {n: ffi.sizeof(n) for n in names}


def _raw(ptr) -> bytes:
    return bytes(ffi.buffer(ptr))


def _from_raw(ctype: str, data: bytes, what: str):
    if len(data) != ffi.sizeof(ctype):
        raise KvmError(22, f"{what}: saved {len(data)} bytes for a {ffi.sizeof(ctype)}-byte {ctype}")
    ptr = ffi.new(ctype + " *")
    ffi.memmove(ptr, data, len(data))
    return ptr


def readable_msrs(vcpu, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS over `indices`, leaving out any this vCPU cannot read (KVM stops at the first
    one it refuses and returns how many it read)."""
    values: dict[int, int] = {}
    todo = list(indices)
    while todo:
        got = vcpu.get_msrs(todo)
        values.update(got)
        todo = todo[len(got) + 1:]      # skip the refused one and go on after it
    return values


def set_msrs_as_saved(vcpu, values: dict[int, int]) -> None:
    """KVM_SET_MSRS for every saved MSR. KVM refuses some writes in some configurations even
    from the VMM (MSR_KVM_ASYNC_PF_INT without an in-kernel LAPIC, for one, even of 0); such an
    MSR is left alone when it already holds the saved value, and is an error otherwise."""
    todo = list(values.items())
    while todo:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(todo), "entries": len(todo)})
        for i, (idx, val) in enumerate(todo):
            msrs.entries[i].index = idx
            msrs.entries[i].data = val
        n = ioctl(vcpu.fd, lib.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if n == len(todo):
            return
        idx, val = todo[n]
        if vcpu.get_msrs([idx]).get(idx) != val:
            raise KvmError(22, f"KVM_SET_MSRS (MSR {idx:#x} = {val:#x} refused)")
        todo = todo[n + 1:]


def save_vcpu(vcpu, msr_indices: list[int], *, irqchip: bool) -> dict:
    state = {name: _raw(getattr(vcpu, get)()) for name, _, get, _ in _VCPU_STRUCTS}
    state["xsave"] = vcpu.get_xsave()
    state["msrs"] = readable_msrs(vcpu, msr_indices)
    state["mp_state"] = vcpu.get_mp_state()
    state["debugregs"] = _raw(vcpu.get_debugregs())
    state["events"] = _raw(vcpu.get_vcpu_events())
    state["lapic"] = _raw(vcpu.get_lapic()) if irqchip else None
    return state


def restore_vcpu(vcpu, state: dict) -> None:
    for name, ctype, _, set_ in _VCPU_STRUCTS:
        if name == "fpu":
            continue                    # the XSAVE image below carries the same state, and more
        getattr(vcpu, set_)(_from_raw(ctype, state[name], name))
    xsave = state["xsave"]
    if len(xsave) != ffi.sizeof("struct kvm_xsave"):
        raise KvmError(22, f"xsave: saved {len(xsave)} bytes, this host's area is "
                           f"{ffi.sizeof('struct kvm_xsave')}")
    vcpu.set_xsave(xsave)
    if state["lapic"] is not None:
        vcpu.set_lapic(_from_raw("struct kvm_lapic_state", state["lapic"], "lapic"))
    set_msrs_as_saved(vcpu, dict(state["msrs"]))
    vcpu.set_mp_state(state["mp_state"])
    vcpu.set_debugregs(_from_raw("struct kvm_debugregs", state["debugregs"], "debugregs"))
    events = _from_raw("struct kvm_vcpu_events", state["events"], "vcpu events")
    # Restore the NMI-pending and SIPI state too, and the interrupt shadow (api.rst, KVM_SET_VCPU_EVENTS).
    events.flags |= (lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                     | lib.KVM_VCPUEVENT_VALID_SHADOW)
    vcpu.set_vcpu_events(events)


_CHIPS = (("pic_master", "KVM_IRQCHIP_PIC_MASTER"), ("pic_slave", "KVM_IRQCHIP_PIC_SLAVE"),
          ("ioapic", "KVM_IRQCHIP_IOAPIC"))


def save_vm(vm, *, irqchip: bool) -> dict:
    """The in-kernel PIC pair, IOAPIC and PIT (with irqchip), and the kvmclock."""
    state: dict = {"clock": vm.get_clock_data().clock}
    if irqchip:
        for name, chip in _CHIPS:
            state[name] = _raw(vm.get_irqchip(getattr(lib, chip)))
        state["pit"] = _raw(vm.get_pit2())
    return state


def restore_vm(vm, state: dict) -> None:
    if "ioapic" in state:
        for name, _ in _CHIPS:
            vm.set_irqchip(_from_raw("struct kvm_irqchip", state[name], name))
        vm.set_pit2(_from_raw("struct kvm_pit_state2", state["pit"], "pit"))


def restore_clock(vm, state: dict) -> None:
    """KVM_SET_CLOCK last, once every vCPU's TSC is back: the guest's clock goes on from the
    moment it was saved."""
    vm.set_clock(state["clock"])
