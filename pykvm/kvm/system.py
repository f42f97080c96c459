"""`Kvm`: the system file descriptor, /dev/kvm itself.

Opening /dev/kvm gives a handle for questions about the host (API version, capabilities, what CPUID
bits and MSRs KVM can offer) and for one action: creating a VM (KVM_CREATE_VM), which returns a new
fd. See Documentation/virt/kvm/api.rst, section 4 ("API description").
"""

from __future__ import annotations

import errno
import os

from ._lib import ffi, ioctl, ioctl_int, lib
from .errors import KvmError, KvmUnavailable

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing (pykvm/record.py)
if TYPE_CHECKING:
    from .vm import Vm

# The KVM device node; PYKVM_KVM_DEVICE overrides it (a differently named node, or tests).
DEV_KVM = os.environ.get("PYKVM_KVM_DEVICE") or "/dev/kvm"     # set but empty: the default

# Capabilities shown by `pykvm info` and used by pykvm: name -> KVM_CAP_* number (from the header).
CAPABILITIES = {
    name: getattr(lib, "KVM_CAP_" + name)
    for name in ("IRQCHIP", "HLT", "USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID", "NR_VCPUS",
                 "MAX_VCPUS", "NR_MEMSLOTS", "PIT2", "IRQFD", "IOEVENTFD", "SET_IDENTITY_MAP_ADDR",
                 "ADJUST_CLOCK", "VCPU_EVENTS", "IMMEDIATE_EXIT", "SPLIT_IRQCHIP", "IRQ_ROUTING",
                 "XSAVE", "TSC_CONTROL", "COALESCED_MMIO", "READONLY_MEM", "X2APIC_API",
                 "SET_GUEST_DEBUG", "GUEST_DEBUG_HW_BPS", "GUEST_DEBUG_HW_WPS")
}


class Kvm:
    """The KVM subsystem (/dev/kvm)."""

    def __init__(self, path: str | None = None):
        path = path or DEV_KVM
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) "
                "and enable virtualization in the firmware") from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} is not accessible to this user: add yourself to the 'kvm' group "
                f"(sudo usermod -aG kvm $USER, then log in again) or run as root") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            version = ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        except KvmError as e:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device ({e}): check the path") from None
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API version {version}; pykvm needs "
                                 f"{lib.KVM_API_VERSION}")
        self.api_version = version

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else 1 or a capability-specific number."""
        return ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def capabilities(self) -> dict[str, int]:
        return {name: self.check_extension(cap) for name, cap in CAPABILITIES.items()}

    @property
    def vcpu_mmap_size(self) -> int:
        """Size of the `struct kvm_run` area each vCPU fd lets us mmap."""
        return ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS)

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest (a `struct kvm_cpuid2 *`).

        Retries with a bigger buffer on E2BIG, as the API asks."""
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            try:
                ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
                return cpuid
            except KvmError as e:
                if e.errno != errno.E2BIG or max_entries > 4096:
                    raise
                max_entries *= 2

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a guest."""
        n = 512
        while True:
            lst = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
                return [lst.indices[i] for i in range(lst.nmsrs)]
            except KvmError as e:
                if e.errno != errno.E2BIG or n > 16384:
                    raise
                n = lst.nmsrs if lst.nmsrs > n else n * 2

    def create_vm(self) -> "Vm":
        from .vm import Vm
        fd = ioctl_int(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)
