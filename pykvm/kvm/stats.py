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
emulator, `insn_emulation` counts those instructions: the one measure of a Linux boot's work
there that does not move with the host's load (a boot of the test kernel is ~18 million of them,
about a microsecond each). `pykvm boot --stats` prints the counters listed in `SHOWN`.
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


def _cumulative_or_instant(flags: int) -> bool:
    kind = flags & lib.KVM_STATS_TYPE_MASK
    return kind in (lib.KVM_STATS_TYPE_CUMULATIVE, lib.KVM_STATS_TYPE_INSTANT,
                    lib.KVM_STATS_TYPE_PEAK)


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
    single-valued counters (histograms are left out)."""

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
        end = 0
        for i in range(header.num_desc):
            at = i * step
            ffi.memmove(desc, block[at:at + ffi.sizeof(desc[0])], ffi.sizeof(desc[0]))
            end = max(end, desc.offset + 8 * desc.size)
            if desc.size != 1 or not _cumulative_or_instant(desc.flags):
                continue
            name = block[at + ffi.sizeof(desc[0]):at + step].split(b"\0", 1)[0].decode()
            self._fields.append((name, desc.offset))
        self._data_offset, self._data_size = header.data_offset, end

    def read(self) -> dict[str, int]:
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return {name: int.from_bytes(data[off:off + 8], "little") for name, off in self._fields}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def summed(readings: list[dict[str, int]], names=SHOWN) -> dict[str, int]:
    """The counters in `names` summed over several vCPUs' readings (absent ones left out)."""
    total: dict[str, int] = {}
    for reading in readings:
        for name in names:
            if name in reading:
                total[name] = total.get(name, 0) + reading[name]
    return total
