"""Constants from kernel headers that code outside this package needs (its own uses stay there).

They come from the compiled binding (csrc/build_ffi.py declares them, the C compiler fills in the
values from the installed headers), so no number here is copied by hand, and the rest of pykvm
still never imports the compiled module itself.
"""

from __future__ import annotations

from ._lib import lib

# <linux/if_tun.h>: the tun driver's ioctls and flags (pykvm/host/tap.py).
IFF_TAP = lib.IFF_TAP              # Ethernet frames (IFF_TUN would be IP packets)
IFF_NO_PI = lib.IFF_NO_PI          # no 4-byte packet-information prefix
IFF_VNET_HDR = lib.IFF_VNET_HDR    # each frame carries a struct virtio_net_hdr
TUNSETIFF = lib.TUNSETIFF
TUNGETFEATURES = lib.TUNGETFEATURES
TUNSETVNETHDRSZ = lib.TUNSETVNETHDRSZ
IFNAMSIZ = lib.IFNAMSIZ

# <linux/kvm_para.h>: what a hypercall returns for a number KVM does not know (pykvm/pvm/gaps.py).
KVM_ENOSYS = lib.KVM_ENOSYS

# <linux/kvm.h>: KVM_SET_GUEST_DEBUG's control bits (pykvm/gdb/stub.py; Vcpu.set_guest_debug).
KVM_GUESTDBG_ENABLE = lib.KVM_GUESTDBG_ENABLE
KVM_GUESTDBG_SINGLESTEP = lib.KVM_GUESTDBG_SINGLESTEP
KVM_GUESTDBG_USE_SW_BP = lib.KVM_GUESTDBG_USE_SW_BP
KVM_GUESTDBG_USE_HW_BP = lib.KVM_GUESTDBG_USE_HW_BP
KVM_GUESTDBG_INJECT_BP = lib.KVM_GUESTDBG_INJECT_BP
KVM_GUESTDBG_BLOCKIRQ = lib.KVM_GUESTDBG_BLOCKIRQ
