"""ELF vmlinux loading: segments by physical address, .bss zeroing, e_entry, the PVH note."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.boot import BootError, load_elf, load_linux, parse_elf
from pykvm.testing.synthetic import KERNEL_MAP, make_elf
from pykvm.boot.zeropage import HVM_START_MAGIC
from pykvm.memory import GuestMemory
from pykvm.x86 import layout

TEXT = b"\x48\x31\xc0\xf4" * 512          # xor rax, rax; hlt
DATA = b"\x11\x22\x33\x44" * 100


def vmlinux(**kw):
    kw.setdefault("pvh_entry", 0x1000100)
    return make_elf([(0x1000000, TEXT, len(TEXT)), (0x1400000, DATA, 0x2000)], 0x1000000,
                    banner=b"Linux version 6.6.6-elf-test (me@here) #1 SMP", **kw)


@pytest.fixture
def mem():
    m = GuestMemory.for_test(64 * layout.MiB)
    m.fill(0, m.size, 0xEE)
    yield m
    m.close()


def one_line(e):
    assert str(e) and "\n" not in str(e)
    return str(e)


def test_segments_go_to_physical_addresses_and_bss_is_zeroed(mem):
    k = load_elf(mem, vmlinux())
    assert mem.read(0x1000000, len(TEXT)) == TEXT
    assert mem.read(0x1400000, len(DATA)) == DATA
    assert mem.read(0x1400000 + len(DATA), 0x2000 - len(DATA)) == bytes(0x2000 - len(DATA))
    assert mem.read(0x1400000 + 0x2000, 4) == b"\xee" * 4      # nothing beyond memsz touched
    assert mem.read(0x1000000 - 4, 4) == b"\xee" * 4
    assert k.entry == 0x1000000 and k.start == 0x1000000 and k.end == 0x1402000


def test_pvh_note_found_with_8_and_4_byte_descriptors():
    assert parse_elf(vmlinux()).pvh_entry == 0x1000100
    assert parse_elf(vmlinux(pvh_entry=None)).pvh_entry is None
    # a 4-byte descriptor (32-bit builds), after an unrelated note
    other = struct.pack("<III", 4, 4, 1) + b"GNU\0" + b"abcd"
    xen = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000200)
    img = bytearray(vmlinux(pvh_entry=0))
    notes_at = img.index(struct.pack("<III", 4, 8, 18))
    # rewrite the PT_NOTE segment's content and size in place
    blob = other + xen
    img[notes_at:notes_at + len(blob)] = blob
    phdr = 64 + 56 * 2
    struct.pack_into("<QQ", img, phdr + 32, len(blob), len(blob))
    assert parse_elf(bytes(img)).pvh_entry == 0x1000200


def test_virtual_entry_is_translated():
    img = make_elf([(0x1000000, TEXT, len(TEXT))], KERNEL_MAP + 0x1000010)
    assert parse_elf(img).entry == 0x1000010


def _as_type(e_type: int, image: bytes) -> bytes:
    """`image` with its ELF header's e_type (offset 16) replaced: 3 is ET_DYN, what a program
    such as /bin/ls is (position-independent) and what a kernel never is."""
    return image[:16] + struct.pack("<H", e_type) + image[18:]


@pytest.mark.parametrize("img, words", [
    (b"MZ\x90\x00" + bytes(100), ["not an ELF"]),
    (make_elf([(0x1000000, TEXT, len(TEXT))], 0x1000000, elfclass=1), ["x86-64"]),
    (make_elf([(0x1000000, TEXT, len(TEXT))], 0x1000000, machine=183), ["EM_AARCH64", "x86-64"]),
    (make_elf([(0x1000000, TEXT, len(TEXT))], 0x2000000), ["entry point", "0x2000000"]),
    (make_elf([(0x1000000, TEXT, 0x10)], 0x1000000), ["filesz"]),
    (make_elf([(0x80000, TEXT, len(TEXT))], 0x80000), ["below 1 MiB"]),
    (make_elf([], 0x1000000), ["PT_LOAD"]),
    (_as_type(3, make_elf([(0x1000000, TEXT, len(TEXT))], 0x1000000)), ["ET_DYN", "not a kernel"]),
    (vmlinux()[:200], ["truncated"]),
    (b"\x7fELF" + bytes(10), ["malformed"]),
])
def test_rejects(img, words):
    with pytest.raises(BootError) as e:
        parse_elf(img)
    msg = one_line(e.value)
    for w in words:
        assert w in msg


def test_segment_outside_ram(mem):
    img = make_elf([(0x3f00000, TEXT, 0x200000)], 0x3f00000)
    with pytest.raises(BootError) as e:
        load_elf(mem, img)
    assert "outside guest RAM" in one_line(e.value) and "at least 65 MiB" in str(e.value)
    assert mem.read(0x3f00000, 4) == b"\xee" * 4               # nothing written on failure


def test_load_linux_with_elf_builds_its_own_header(mem):
    plan = load_linux(mem, vmlinux(), "console=ttyS0", initrd=b"R" * 3000)
    assert plan.entry_rip == 0x1000000 and plan.kernel_end == 0x1402000
    zp = mem.read(layout.ZERO_PAGE, 4096)
    assert struct.unpack_from("<H", zp, 0x1fe)[0] == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x206)[0] == 0x020f
    assert zp[0x210] == 0xff and zp[0x211] & 0x01
    assert struct.unpack_from("<I", zp, 0x228)[0] == layout.CMDLINE
    assert struct.unpack_from("<I", zp, 0x238)[0] == layout.CMDLINE_MAX - 1
    assert struct.unpack_from("<II", zp, 0x218) == plan.initrd
    assert zp[0x1ef] == 0                                        # sentinel
    assert plan.description["kernel_version"] == "6.6.6-elf-test (me@here) #1 SMP"
    assert plan.description["format"] == "ELF vmlinux"
    # PVH: start_info written and pointing at the same command line and initrd
    assert plan.pvh_entry == 0x1000100 and plan.start_info_gpa == layout.PVH_START_INFO
    si = mem.read(layout.PVH_START_INFO, 0x38)
    assert struct.unpack_from("<II", si, 0)[0] == HVM_START_MAGIC
    assert struct.unpack_from("<Q", si, 0x18)[0] == layout.CMDLINE
    assert struct.unpack_from("<I", si, 0x0c)[0] == 1
    assert struct.unpack_from("<QQ", mem.read(layout.PVH_MODLIST, 16)) == plan.initrd


def test_load_linux_elf_without_pvh_note(mem):
    plan = load_linux(mem, vmlinux(pvh_entry=None), "")
    assert plan.pvh_entry is None and plan.start_info_gpa is None and plan.initrd is None
    assert mem.read(layout.CMDLINE, 1) == b"\0"


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MEM = GuestMemory.for_test(24 * layout.MiB)
GOOD = vmlinux()


def _parse_or_booterror(data):
    try:
        k = parse_elf(data)
    except BootError as e:
        one_line(e)
        return
    load_linux(FUZZ_MEM, data, "") if k.end <= FUZZ_MEM.size else None


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_after_magic(tail):
    _parse_or_booterror(b"\x7fELF" + tail)


@FUZZ
@given(st.integers(0, len(GOOD)))
def test_truncated_elf(n):
    _parse_or_booterror(GOOD[:n])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 64 + 56 * 3 + 40), st.integers(1, 255)), min_size=1,
                max_size=6))
def test_corrupt_headers(flips):
    data = bytearray(GOOD)
    for offset, xor in flips:
        data[offset] ^= xor
    try:
        _parse_or_booterror(bytes(data))
    except BootError as e:      # load_linux may refuse what parse_elf accepted (e.g. RAM too small)
        one_line(e)
