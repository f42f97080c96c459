"""The KVM binding: one class per file descriptor, one method per ioctl.

    Kvm   (/dev/kvm)       -> create_vm()  -> Vm
    Vm    (KVM_CREATE_VM)  -> create_vcpu() -> Vcpu
    Vcpu  (KVM_CREATE_VCPU) -> run() -> a typed exit (pykvm.kvm.exits)

A failed ioctl raises `KvmError` naming the ioctl. Only this package touches the compiled module.
"""

from .errors import KvmError, KvmUnavailable
from .system import Kvm
from .vm import Vm
from .vcpu import Vcpu, KICK_SIGNAL
from . import exits

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "KICK_SIGNAL", "exits"]
