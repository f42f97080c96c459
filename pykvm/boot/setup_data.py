"""`setup_data`: extra boot information a loader hands the kernel as a linked list.

Boot protocol 2.09+ (Documentation/arch/x86/boot.rst, "setup_data"): the header field `setup_data`
(offset 0x250) holds the physical address of the first node of a singly linked list of

    struct setup_data {           /* arch/x86/include/uapi/asm/bootparam.h */
        __u64 next;               /* physical address of the next node, 0 ends the list */
        __u32 type;               /* SETUP_* */
        __u32 len;                /* bytes of data[] */
        __u8  data[];
    };

pykvm uses one node type: SETUP_RNG_SEED (9, Linux 5.20/6.0+), random bytes for the kernel's
entropy pool, as QEMU and firmware with a hardware RNG provide. Without it a guest that lacks a usable
RDRAND (we hide it on KVM-PVM hosts, where it is not emulated) gathers entropy from timer jitter
before "random: crng init done", which under instruction emulation takes minutes. The kernel credits
the seed when built with RANDOM_TRUST_BOOTLOADER (6.1's default) and wipes it after use.
"""

from __future__ import annotations

from construct import Bytes, Int32ul, Int64ul, Struct, this

SETUP_RNG_SEED = 9
RNG_SEED_BYTES = 32

SETUP_DATA = Struct(
    "next" / Int64ul,       # +0
    "type" / Int32ul,       # +8
    "len" / Int32ul,        # +12
    "data" / Bytes(this.len),  # +16
)


def rng_seed_node(seed: bytes, next_gpa: int = 0) -> bytes:
    """A SETUP_RNG_SEED node carrying `seed`."""
    return SETUP_DATA.build({"next": next_gpa, "type": SETUP_RNG_SEED, "len": len(seed), "data": seed})
