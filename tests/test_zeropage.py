"""The zero page (struct boot_params), the e820 map and the PVH start_info, checked at raw offsets."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.boot import BootError, E820Entry, build_pvh_start_info, build_zero_page, e820_table
from pykvm.boot.bzimage import KASLR_FLAG
from pykvm.testing.synthetic import make_bzimage
from pykvm.boot.zeropage import E820_RAM, HVM_START_MAGIC
from pykvm.x86 import layout

MiB, GiB = layout.MiB, layout.GiB
HEADER = make_bzimage(b"\x1f\x8b" + bytes(64))[0x1f1:0x26c]


def ranges(entries):
    return [(e.addr, e.end, e.type) for e in entries]


def test_e820_below_the_pci_hole():
    assert ranges(e820_table(512 * MiB)) == [
        (0, layout.EBDA_START, E820_RAM), (layout.HIMEM_START, 512 * MiB, E820_RAM)]


def test_e820_exactly_up_to_the_hole():
    assert ranges(e820_table(3 * GiB)) == [
        (0, layout.EBDA_START, E820_RAM), (layout.HIMEM_START, layout.MMIO_HOLE_START, E820_RAM)]


def test_e820_above_the_pci_hole():
    assert ranges(e820_table(6 * GiB)) == [
        (0, layout.EBDA_START, E820_RAM),
        (layout.HIMEM_START, layout.MMIO_HOLE_START, E820_RAM),
        (4 * GiB, 4 * GiB + 3 * GiB, E820_RAM)]


def test_e820_tiny_memory():
    assert ranges(e820_table(256 * 1024)) == [(0, 256 * 1024, E820_RAM)]


@given(st.integers(1 * MiB + 1, 1 << 40))
def test_e820_properties(size):
    entries = e820_table(size)
    for a, b in zip(entries, entries[1:]):
        assert a.end <= b.addr                                   # sorted, disjoint
    for e in entries:
        assert e.size > 0 and e.type == E820_RAM
        assert not (e.addr < layout.MMIO_HOLE_END and e.end > layout.MMIO_HOLE_START)
        assert not (e.addr < layout.HIMEM_START and e.end > layout.EBDA_START)
    assert sum(e.size for e in entries) == size - (layout.HIMEM_START - layout.EBDA_START)


def page(**kw):
    args = dict(cmdline_gpa=layout.CMDLINE, cmdline_size=2047, e820=e820_table(6 * GiB))
    args.update(kw)
    return build_zero_page(HEADER, **args)


def u(fmt, data, off):
    return struct.unpack_from(fmt, data, off)[0]


def test_zero_page_fields_at_their_offsets():
    zp = page(initrd=(0x7000000, 0x123456))
    assert len(zp) == 4096
    assert zp[0x1f1:0x1f2] == HEADER[:1]                         # setup_sects copied
    assert u("<H", zp, 0x1fe) == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert u("<H", zp, 0x206) == 0x020f
    assert zp[0x210] == 0xff                                     # type_of_loader
    assert zp[0x211] & 0x81 == 0x81                              # LOADED_HIGH | CAN_USE_HEAP
    assert u("<H", zp, 0x224) == 0xde00                          # heap_end_ptr
    assert u("<I", zp, 0x228) == layout.CMDLINE and u("<I", zp, 0x0c8) == 0
    assert u("<I", zp, 0x218) == 0x7000000 and u("<I", zp, 0x21c) == 0x123456
    assert u("<I", zp, 0x0c0) == 0 and u("<I", zp, 0x0c4) == 0
    assert u("<I", zp, 0x238) == 2047                            # the kernel's own cmdline_size kept
    assert zp[0x1ef] == 0                                        # sentinel
    assert zp[0x1e8] == 3
    table = [struct.unpack_from("<QQI", zp, 0x2d0 + 20 * i) for i in range(4)]
    assert table == [(0, layout.EBDA_START, 1), (layout.HIMEM_START, 3 * GiB - MiB, 1),
                     (4 * GiB, 3 * GiB, 1), (0, 0, 0)]


def test_header_bytes_other_than_loader_fields_are_kept():
    zp = page()
    loader_written = {0x210, 0x211, 0x224, 0x225, 0x228, 0x229, 0x22a, 0x22b} | set(
        range(0x218, 0x220))
    for off in range(0x1f1, 0x26c):
        if off not in loader_written:
            assert zp[off] == HEADER[off - 0x1f1], hex(off)


def test_high_initrd_and_cmdline_use_ext_fields():
    zp = page(initrd=(0x1_2345_6000, 0x1_0000_0010), cmdline_gpa=0x2_0000_1000)
    assert u("<I", zp, 0x218) == 0x2345_6000 and u("<I", zp, 0x0c0) == 1
    assert u("<I", zp, 0x21c) == 0x10 and u("<I", zp, 0x0c4) == 1
    assert u("<I", zp, 0x228) == 0x1000 and u("<I", zp, 0x0c8) == 2


def test_kaslr_flag_cleared():
    hdr = bytearray(HEADER)
    hdr[0x211 - 0x1f1] |= KASLR_FLAG
    zp = build_zero_page(bytes(hdr), cmdline_gpa=layout.CMDLINE, cmdline_size=0, e820=[])
    assert not zp[0x211] & KASLR_FLAG


def test_minimal_header_without_bzimage():
    zp = build_zero_page(None, cmdline_gpa=layout.CMDLINE, cmdline_size=4095,
                         e820=e820_table(64 * MiB))
    assert u("<H", zp, 0x1fe) == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert u("<H", zp, 0x206) == 0x020f and u("<I", zp, 0x238) == 4095
    assert u("<I", zp, 0x230) == 0x1000000 and u("<H", zp, 0x236) & 1
    assert zp[0x1e8] == 2 and u("<I", zp, 0x218) == 0 and u("<I", zp, 0x21c) == 0


def test_acpi_rsdp():
    assert u("<Q", page(acpi_rsdp=0xe0000), 0x070) == 0xe0000


def test_too_many_e820_entries():
    with pytest.raises(BootError, match="129 e820 entries"):
        page(e820=[E820Entry(i * 2 * MiB, MiB, 1) for i in range(129)])


def test_pvh_start_info():
    e820 = e820_table(6 * GiB)
    blobs = build_pvh_start_info(cmdline_gpa=layout.CMDLINE, e820=e820, initrd=(0x5000000, 777),
                                 acpi_rsdp=0xe0000)
    si = blobs[layout.PVH_START_INFO]
    assert len(si) == 0x38
    assert struct.unpack_from("<IIII", si, 0) == (HVM_START_MAGIC, 1, 0, 1)
    assert struct.unpack_from("<QQQQI", si, 0x10) == (
        layout.PVH_MODLIST, layout.CMDLINE, 0xe0000, layout.PVH_MEMMAP, 3)
    assert struct.unpack_from("<QQQ", blobs[layout.PVH_MODLIST], 0) == (0x5000000, 777, 0)
    memmap = blobs[layout.PVH_MEMMAP]
    assert [struct.unpack_from("<QQI", memmap, 24 * i) for i in range(3)] == [
        (e.addr, e.size, e.type) for e in e820]
    assert layout.PVH_MEMMAP + len(memmap) <= layout.PVH_MEMMAP_END <= layout.ZERO_PAGE


def test_pvh_without_initrd():
    blobs = build_pvh_start_info(cmdline_gpa=layout.CMDLINE, e820=e820_table(64 * MiB))
    assert layout.PVH_MODLIST not in blobs
    assert struct.unpack_from("<IQ", blobs[layout.PVH_START_INFO], 0x0c) == (0, 0)


def test_rng_seed_reaches_the_kernel_through_setup_data():
    """load_linux links a SETUP_RNG_SEED node from hdr.setup_data (boot.rst, protocol 2.09)."""
    import struct
    from pykvm.boot import load_linux
    from pykvm.boot.setup_data import SETUP_RNG_SEED
    from pykvm.testing.synthetic import compress, make_bzimage, make_elf
    from pykvm.memory import GuestMemory
    from pykvm.x86 import layout
    image = make_bzimage(compress(make_elf([(0x1000000, b"\x90" * 64, 0x1000)], 0x1000000), "gzip"))
    mem = GuestMemory.for_test(64 << 20)
    load_linux(mem, image, "console=ttyS0")
    ptr = mem.read_int(layout.ZERO_PAGE + 0x250, 8)
    assert ptr == layout.SETUP_DATA
    nxt, typ, length = struct.unpack("<QII", mem.read(ptr, 16))
    assert (nxt, typ, length) == (0, SETUP_RNG_SEED, 32)
    assert mem.read(ptr + 16, 32) != bytes(32)
    mem2 = GuestMemory.for_test(64 << 20)
    load_linux(mem2, image, "console=ttyS0", rng_seed=False)
    assert mem2.read_int(layout.ZERO_PAGE + 0x250, 8) == 0
