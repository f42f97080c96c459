"""The KVM binding: one class per file descriptor, one method per ioctl.

    Kvm   (/dev/kvm)       -> create_vm()  -> Vm
    Vm    (KVM_CREATE_VM)  -> create_vcpu() -> Vcpu
    Vcpu  (KVM_CREATE_VCPU) -> run() -> a typed exit (pykvm.kvm.exits)

A failed ioctl raises `KvmError` naming the ioctl. Only this package touches the compiled module
(`_lib`): the C run loop (`fastpath`), the C half of virtio-blk in that loop (`vblk`) and header
constants others need (`headers`) live here too.
`exits` and `errors` are plain Python, and importing this package loads the compiled module only
when `Kvm`, `Vm`, `Vcpu` or `KICK_SIGNAL` is first asked for, so the exit handlers and the pure half
of pykvm.pvm work (and are tested) without it.
"""

from . import exits
from .errors import KvmError, KvmUnavailable

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "KICK_SIGNAL", "exits"]


def __getattr__(name):
    try:
        if name == "Kvm":
            from .system import Kvm
            return Kvm
        if name == "Vm":
            from .vm import Vm
            return Vm
        if name in ("Vcpu", "KICK_SIGNAL"):
            from . import vcpu
            return getattr(vcpu, name)
    except AttributeError as e:
        # Raised while loading the module (a binding built from older declarations, say): say so,
        # rather than let `from pykvm.kvm import Kvm` report that the name does not exist.
        raise ImportError(f"pykvm.kvm.{name} failed to load: {e}") from e
    raise AttributeError(f"module 'pykvm.kvm' has no attribute {name!r}")
