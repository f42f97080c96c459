"""KVM's own counters for a VM or a vCPU: the binary statistics file (KVM_GET_STATS_FD).

KVM counts what it does for a guest: every VM exit (also the ones it handles without telling the
VMM), instructions it had to emulate, halts, injected interrupts. Since Linux 5.14 the ioctl
KVM_GET_STATS_FD on a VM or vCPU fd returns a read-only file that describes and holds them
(Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"):

    struct kvm_stats_header       at offset 0: num_desc, name_size, and where the rest is
    struct kvm_stats_desc[]       at desc_offset, each followed by name_size bytes of its name
    u64 data[]                    at data_offset; a counter's `size` values start at desc.offset

The descriptors do not change while the fd is open; the data does, so a reader keeps the fd and
re-reads only the data block (pread at data_offset).

Why pykvm reads them: the exits pykvm sees are the ones that reach user space. KVM's `exits`
counts them all. And on a KVM-PVM host, where the guest's kernel code runs in KVM's instruction
emulator, `insn_emulation` counts those instructions: a measure of a Linux boot's work there that
moves far less with the host's load than wall time (a boot of the test kernel is ~18 million of
them, about a microsecond each). The part that does move is the timer tick: it comes every 10 ms
of real time whatever the guest got done, ~0.12-0.16 M instructions per second of wall time for
the test kernel, so a boot slowed by a loaded host also counts more.
`pykvm boot --stats` prints the counters listed in `SHOWN`.
"""

from __future__ import annotations

import os

from ._lib import ffi, ioctl_int, lib

# The counters `stats["kvm"]` carries (all vCPUs summed), with what each counts (arch/x86/kvm/x86.c,
# kvm_vcpu_stats_desc): KVM's view, next to the exits pykvm itself handles.
SHOWN = {
    "exits": "VM exits of every kind, also those KVM handled itself",
    "insn_emulation": "guest instructions run by KVM's emulator (all guest CPL0 code on KVM-PVM)",
    "insn_emulation_fail": "instructions the emulator could not run (an exit to the VMM)",
    "halt_exits": "hlt exits",
    "irq_injections": "interrupts injected into the guest",
    "irq_window_exits": "exits to wait for the guest to accept an interrupt",
    "hypercalls": "vmcall/vmmcall hypercalls",
    "signal_exits": "KVM_RUN returns because a signal was pending (pykvm's kicks)",
}


# What a statistic is, from the type bits of its descriptor's flags (api.rst, KVM_GET_STATS_FD):
#   CUMULATIVE    a count that only grows: exits, insn_emulation, most of KVM's (one u64)
#   INSTANT       a value now, up or down: pages mapped, whether the vCPU is blocking (one u64)
#   PEAK          the highest a measurement has reached, only grows: max_mmu_rmap_size (one u64)
#   LINEAR_HIST   a histogram: `size` u64 buckets, each bucket_size wide
#   LOG_HIST      a histogram: `size` u64 buckets, each twice as wide as the one before
#                 ([0, 1), [1, 2), [2, 4), ...; the last open-ended)
# pykvm reads the single values (the first three) and leaves the histograms out.
_SINGLE_VALUE_TYPES = {"cumulative": lib.KVM_STATS_TYPE_CUMULATIVE,
                       "instant": lib.KVM_STATS_TYPE_INSTANT, "peak": lib.KVM_STATS_TYPE_PEAK}


def _single_value_type(flags: int, size: int) -> str | None:
    """"cumulative", "instant" or "peak" for a one-u64 statistic; None for a histogram (or a type
    newer than this code, which may not be a single value)."""
    kind = flags & lib.KVM_STATS_TYPE_MASK
    for name, value in _SINGLE_VALUE_TYPES.items():
        if kind == value and size == 1:
            return name
    return None


def open_stats(fd: int) -> "KvmStats":
    """The statistics of the VM or vCPU behind `fd` (KvmError where KVM has no KVM_GET_STATS_FD)."""
    stats_fd = ioctl_int(fd, lib.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")
    try:
        return KvmStats(stats_fd)
    except BaseException:
        os.close(stats_fd)
        raise


class KvmStats:
    """A statistics file (which it owns and closes): `read()` returns {name: value} for the
    single-valued statistics (histograms are left out); `types` says which kind each one is."""

    def __init__(self, stats_fd: int):
        self.fd = stats_fd
        self._layout()

    def _layout(self) -> None:
        raw = os.pread(self.fd, ffi.sizeof("struct kvm_stats_header"), 0)
        header = ffi.new("struct kvm_stats_header *")
        ffi.memmove(header, raw, len(raw))
        step = ffi.sizeof("struct kvm_stats_desc") + header.name_size
        block = os.pread(self.fd, step * header.num_desc, header.desc_offset)
        desc = ffi.new("struct kvm_stats_desc *")
        self._fields: list[tuple[str, int]] = []      # (name, byte offset in the data block)
        self.types: dict[str, str] = {}                # name: "cumulative", "instant" or "peak"
        end = 0
        for i in range(header.num_desc):
            at = i * step
            ffi.memmove(desc, block[at:at + ffi.sizeof(desc[0])], ffi.sizeof(desc[0]))
            end = max(end, desc.offset + 8 * desc.size)
            kind = _single_value_type(desc.flags, desc.size)
            if kind is None:
                continue
            name = block[at + ffi.sizeof(desc[0]):at + step].split(b"\0", 1)[0].decode()
            self._fields.append((name, desc.offset))
            self.types[name] = kind
        self._data_offset, self._data_size = header.data_offset, end

    def read(self) -> dict[str, int]:
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return {name: int.from_bytes(data[off:off + 8], "little") for name, off in self._fields}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def summed(readings: list[dict[str, int]], names=SHOWN) -> dict[str, int]:
    """The counters in `names` summed over several vCPUs' readings (absent ones left out).
    A sum means something for cumulative counters, which every name in SHOWN is (x86.c declares
    them with STATS_DESC_COUNTER); a peak would want the largest reading instead."""
    total: dict[str, int] = {}
    for reading in readings:
        for name in names:
            if name in reading:
                total[name] = total.get(name, 0) + reading[name]
    return total
