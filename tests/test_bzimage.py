"""bzImage parsing, payload decompression and the load_linux stage, on synthetic and real images."""

import glob
import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pykvm.boot import BootError, decompress_payload, detect_compression, load_linux, parse_bzimage
from pykvm.boot import place_initrd
from pykvm.boot.bzimage import CAN_USE_HEAP, KASLR_FLAG, LOADED_HIGH, XLF_KERNEL_64
from pykvm.boot.elf import parse_elf
from pykvm.testing.synthetic import compress, make_bzimage, make_elf
from pykvm.memory import GuestMemory, MmapBackend, Region
from pykvm.x86 import layout

KINDS = ["gzip", "bzip2", "xz", "lzma", "lz4", "zstd", "none"]
CODE = bytes(range(256)) * 16                     # 4 KiB of recognizable "text"
VMLINUX = make_elf([(0x1000000, CODE, 0x3000), (0x1200000, b"DATA" * 64, 0x1000)], 0x1000000,
                   pvh_entry=0x1000040, banner=b"Linux version 6.1.0-fake (t@t) #1")
SMALL_INIT = 0x400000                             # small init_size so fuzzing can use 32 MiB of RAM


def image(kind="gzip", **kw):
    return make_bzimage(compress(VMLINUX, kind), **kw)


def one_line(e: BootError) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


# --- header parsing -------------------------------------------------------------------------------

def test_parse_header_fields():
    img = image("gzip", setup_sects=4)
    bz = parse_bzimage(img)
    h = bz.header
    assert h.setup_sects == 4 and h.boot_flag == 0xAA55 and h.header == b"HdrS"
    assert h.version == 0x020f and bz.protocol == "2.15"
    assert h.xloadflags & XLF_KERNEL_64
    assert h.cmdline_size == 2047 and h.initrd_addr_max == 0x7fffffff
    assert h.pref_address == 0x1000000 and h.init_size == 0x2000000
    assert len(bz.setup) == 5 * 512 and bz.kernel == img[5 * 512:]
    assert bz.payload == compress(VMLINUX, "gzip")
    assert bz.kernel[h.payload_offset:h.payload_offset + h.payload_length] == bz.payload
    assert bz.version_string == "6.1.0-synthetic (pykvm@tests) #1 SMP"
    # the jump at 0x200 says where the header ends: 0x26c for protocol 2.15
    assert len(bz.header_bytes) == 0x26c - 0x1f1 and bz.header_bytes == img[0x1f1:0x26c]


def test_header_offsets_match_boot_rst():
    """Read a few fields at their boot.rst offsets by hand, independently of the construct struct."""
    img = image("gzip", setup_sects=7, init_size=0x1234000, cmdline_size=0x7ff)
    h = parse_bzimage(img).header
    assert img[0x1f1] == h.setup_sects == 7
    assert struct.unpack_from("<H", img, 0x206)[0] == h.version
    assert struct.unpack_from("<I", img, 0x22c)[0] == h.initrd_addr_max
    assert struct.unpack_from("<H", img, 0x236)[0] == h.xloadflags
    assert struct.unpack_from("<I", img, 0x238)[0] == h.cmdline_size == 0x7ff
    assert struct.unpack_from("<II", img, 0x248) == (h.payload_offset, h.payload_length)
    assert struct.unpack_from("<Q", img, 0x258)[0] == h.pref_address
    assert struct.unpack_from("<I", img, 0x260)[0] == h.init_size == 0x1234000


def test_setup_sects_zero_means_four():
    img = bytearray(image("gzip", setup_sects=4))
    img[0x1f1] = 0
    bz = parse_bzimage(bytes(img))
    assert len(bz.setup) == 5 * 512 and bz.payload == compress(VMLINUX, "gzip")


def _patched(img: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("mutate, words", [
    (lambda i: i[:0x200], ["too short", "truncated"]),
    (lambda i: _patched(i, 0x1fe, "<H", 0x1234), ["0xAA55", "bzImage"]),
    (lambda i: _patched(i, 0x202, "<4s", b"HdrZ"), ["HdrS"]),
    (lambda i: _patched(i, 0x206, "<H", 0x020b), ["2.11", "2.12"]),
    (lambda i: _patched(i, 0x236, "<H", 0), ["XLF_KERNEL_64", "64-bit"]),
    (lambda i: _patched(i, 0x1f1, "<B", 64), ["setup_sects=64", "out of range"]),
    (lambda i: i[:5 * 512], ["setup_sects=4", "truncated"]),
    (lambda i: i[:5 * 512 + 0x300], ["payload", "outside"]),
    (lambda i: _patched(i, 0x24c, "<I", 0), ["payload"]),
    (lambda i: _patched(i, 0x230, "<I", 0x300000), ["kernel_alignment", "power of two"]),
])
def test_rejects_with_one_clear_line(mutate, words):
    with pytest.raises(BootError) as e:
        parse_bzimage(mutate(image("gzip")))
    msg = one_line(e.value)
    for w in words:
        assert w in msg


# --- decompression --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_each_decompressor_gives_back_the_vmlinux(kind):
    bz = parse_bzimage(image(kind))
    assert detect_compression(bz.payload) == kind
    assert decompress_payload(bz.payload) == (kind, VMLINUX)


def test_lz4_legacy_multiple_blocks_and_restarted_frame():
    big = bytes(range(251)) * (9 * 1024 * 1024 // 251)     # > 8 MiB: two legacy blocks
    payload = compress(big, "lz4")
    assert decompress_payload(payload) == ("lz4", big)
    # a second frame magic between blocks is skipped, as lib/decompress_unlz4.c does
    body = payload[4:-4]
    first = struct.unpack_from("<I", body)[0]
    restarted = payload[:4] + body[:4 + first] + payload[:4] + body[4 + first:] + payload[-4:]
    assert decompress_payload(restarted) == ("lz4", big)


def test_gzip_with_and_without_trailing_bytes():
    import gzip
    plain = gzip.compress(VMLINUX)
    assert decompress_payload(plain)[1] == VMLINUX
    assert decompress_payload(plain + b"\x01\x02\x03\x04" + b"\0" * 12)[1] == VMLINUX


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "lzma", "lz4", "zstd"])
def test_truncated_payload_names_the_compression(kind):
    payload = compress(VMLINUX, kind)
    with pytest.raises(BootError) as e:
        decompress_payload(payload[:len(payload) // 2])
    assert kind in one_line(e.value)


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "lz4", "zstd"])
def test_corrupt_payload_names_the_compression(kind):
    payload = bytearray(compress(VMLINUX, kind))
    for i in range(16, min(len(payload) - 8, 400), 7):
        payload[i] ^= 0x5a
    try:
        _, out = decompress_payload(bytes(payload))
    except BootError as e:
        assert kind in one_line(e)
    else:
        assert out != VMLINUX   # a codec without checksums may "succeed"; the ELF check catches it


def test_unknown_and_lzo_payloads():
    with pytest.raises(BootError, match="no known compression"):
        decompress_payload(b"\x00\x01\x02\x03" * 8)
    with pytest.raises(BootError, match="LZO.*decompress=False"):
        decompress_payload(b"\x89LZO\x00\x0d\x0a\x1a\x0a" + bytes(32))


# --- load_linux: the bzImage paths ---------------------------------------------------------------

@pytest.fixture
def mem():
    m = GuestMemory.for_test(128 * layout.MiB)
    m.fill(0, m.size, 0xAA)                       # garbage, so zeroing is tested
    yield m
    m.close()


def _zp(mem, off, fmt):
    return struct.unpack_from(fmt, mem.read(layout.ZERO_PAGE + off, 8))[0]


@pytest.mark.parametrize("kind", ["gzip", "zstd", "lz4"])
def test_load_decompressed_bzimage(mem, kind):
    plan = load_linux(mem, image(kind), "console=ttyS0 root=/dev/vda", initrd=b"I" * 5000)
    assert plan.entry_rip == 0x1000000
    assert (plan.zero_page_gpa, plan.stack, plan.cr3) == (layout.ZERO_PAGE, layout.BOOT_STACK,
                                                          layout.PML4)
    assert mem.read(0x1000000, len(CODE)) == CODE
    assert mem.read(0x1000000 + len(CODE), 0x3000 - len(CODE)) == bytes(0x3000 - len(CODE))  # bss
    assert mem.read(0x1200000, 8) == b"DATADATA"
    assert plan.kernel_start == 0x1000000 and plan.kernel_end == 0x1000000 + 0x2000000  # init_size
    assert mem.read(layout.CMDLINE, 30) == b"console=ttyS0 root=/dev/vda\0" + b"\xaa" * 2
    # zero page: setup header copied, loader fields set
    assert _zp(mem, 0x1fe, "<H") == 0xAA55 and mem.read(layout.ZERO_PAGE + 0x202, 4) == b"HdrS"
    assert _zp(mem, 0x210, "<B") == 0xff
    assert _zp(mem, 0x211, "<B") & (LOADED_HIGH | CAN_USE_HEAP) == LOADED_HIGH | CAN_USE_HEAP
    assert _zp(mem, 0x228, "<I") == layout.CMDLINE
    assert _zp(mem, 0x260, "<I") == 0x2000000                    # init_size came from the image
    gpa, size = plan.initrd
    assert (_zp(mem, 0x218, "<I"), _zp(mem, 0x21c, "<I")) == (gpa, size) == (gpa, 5000)
    assert mem.read(gpa, 5000) == b"I" * 5000
    d = plan.description
    assert d["compression"] == kind and d["format"] == "bzImage" and d["protocol"] == "2.15"
    assert d["kernel_version"].startswith("6.1.0-synthetic")
    assert plan.pvh_entry == 0x1000040 and plan.start_info_gpa == layout.PVH_START_INFO


def test_kaslr_flag_from_image_is_cleared(mem):
    img = bytearray(image("gzip"))
    img[0x211] |= KASLR_FLAG
    load_linux(mem, bytes(img), "")
    assert not _zp(mem, 0x211, "<B") & KASLR_FLAG


def test_load_classic_relocatable_at_pref_address(mem):
    img = image("gzip")
    bz = parse_bzimage(img)
    plan = load_linux(mem, img, "quiet", decompress=False)
    assert plan.kernel_start == 0x1000000 and plan.entry_rip == 0x1000000 + 0x200
    assert mem.read(0x1000000, len(bz.kernel)) == bz.kernel
    assert plan.kernel_end == 0x1000000 + 0x2000000
    assert plan.pvh_entry is None and plan.description["compression"] == "in guest"


def test_load_classic_respects_kernel_alignment(mem):
    plan = load_linux(mem, image("gzip", pref_address=0x1100000, kernel_alignment=0x400000),
                      "", decompress=False)
    assert plan.kernel_start == 0x1400000 and plan.entry_rip == 0x1400200


def test_load_classic_non_relocatable_at_code32_start(mem):
    plan = load_linux(mem, image("gzip", relocatable=0), "", decompress=False)
    assert plan.kernel_start == 0x100000 and plan.entry_rip == 0x100200
    # the non-relocatable kernel still unpacks at pref_address (LOAD_PHYSICAL_ADDR) + init_size
    assert plan.kernel_end == 0x1000000 + 0x2000000


def test_load_classic_rejects_code32_start_below_1mib(mem):
    img = _patched(image("gzip", relocatable=0), 0x214, "<I", 0x8000)
    with pytest.raises(BootError, match="code32_start 0x8000"):
        load_linux(mem, img, "", decompress=False)


def test_cmdline_longer_than_kernel_allows(mem):
    img = image("gzip", cmdline_size=32)
    load_linux(mem, img, "a" * 32)
    with pytest.raises(BootError) as e:
        load_linux(mem, img, "a" * 33)
    assert "cmdline_size" in one_line(e.value) and "33" in str(e.value)


def test_memory_too_small_for_init_size():
    m = GuestMemory.for_test(40 * layout.MiB)
    with pytest.raises(BootError) as e:
        load_linux(m, image("gzip"), "")          # needs 16 MiB + 32 MiB init_size
    assert "at least 48 MiB" in one_line(e.value)
    with pytest.raises(BootError) as e:
        load_linux(GuestMemory.for_test(64 * layout.MiB), image("gzip"), "",
                   initrd=bytes(20 * layout.MiB))
    assert "at least 68 MiB" in one_line(e.value) and "initrd" in str(e.value)


# --- initrd placement ------------------------------------------------------------------------------

def test_initrd_high_page_aligned_below_limit():
    addr = place_initrd(5000, kernel_end=0x3000000, limit=0x8000000)
    assert addr == 0x8000000 - 0x2000 and addr % 0x1000 == 0 and addr + 5000 <= 0x8000000


def test_initrd_exactly_fits_and_one_byte_more_does_not():
    assert place_initrd(0x1000000, kernel_end=0x3000000, limit=0x4000000) == 0x3000000
    with pytest.raises(BootError, match="at least 65 MiB"):
        place_initrd(0x1000001, kernel_end=0x3000000, limit=0x4000000)


@given(size=st.integers(1, 1 << 30), kernel_end=st.integers(0x100000, 1 << 31),
       limit=st.integers(0x100000, 0xc0000000))
def test_initrd_placement_bounds(size, kernel_end, limit):
    try:
        addr = place_initrd(size, kernel_end=kernel_end, limit=limit)
    except BootError as e:
        one_line(e)
        assert -(-kernel_end // 4096) * 4096 + size > limit - 4095
        return
    assert addr % 4096 == 0 and addr >= kernel_end and addr + size <= limit
    assert addr + 4096 + size > limit            # as high as possible


def test_initrd_respects_initrd_addr_max(mem):
    plan = load_linux(mem, image("gzip", initrd_addr_max=0x5ffffff), "", initrd=b"x" * 10)
    assert plan.initrd == (0x6000000 - 0x1000, 10)


def test_initrd_stays_below_pci_hole_with_memory_above_4g():
    """4 GiB of RAM: 3 GiB below the hole, 1 GiB at 4 GiB; the initrd goes under initrd_addr_max."""
    try:
        regions = [Region(gpa, size, MmapBackend(size, hugepages=False))
                   for gpa, size in layout.ram_regions(4 * layout.GiB)]
    except (OSError, ValueError) as e:
        pytest.skip(f"cannot map 4 GiB of address space here: {e}")
    m = GuestMemory(regions)
    try:
        plan = load_linux(m, image("gzip", initrd_addr_max=0xffffffff), "", initrd=b"y" * 100)
        assert plan.initrd == (layout.MMIO_HOLE_START - 0x1000, 100)
        assert _zp(m, 0x1e8, "<B") == 3                              # e820: 3 RAM ranges
        assert _zp(m, 0x2d0 + 2 * 20, "<Q") == layout.MMIO_HOLE_END
    finally:
        m.close()


# --- a real kernel, if one is on this host ------------------------------------------------------

def _real_kernels():
    """Host kernels, pykvm's cached ones, and $PYKVM_TEST_BZIMAGE (a path) if set."""
    paths = glob.glob("/boot/vmlinuz-*") + glob.glob(
        os.path.expanduser("~/.cache/pykvm/**/vmlinuz*"), recursive=True)
    paths += [os.environ["PYKVM_TEST_BZIMAGE"]] if os.environ.get("PYKVM_TEST_BZIMAGE") else []
    return [p for p in paths if os.path.isfile(p) and os.access(p, os.R_OK)]


@pytest.mark.skipif(not _real_kernels(), reason="no readable /boot/vmlinuz-* or ~/.cache/pykvm kernel")
@pytest.mark.parametrize("path", _real_kernels()[:2])
def test_real_bzimage(path):
    data = open(path, "rb").read()
    bz = parse_bzimage(data)
    assert bz.header.version >= 0x020c and bz.version_string
    kind, vmlinux = decompress_payload(bz.payload)
    elf = parse_elf(vmlinux)
    assert any(s.paddr <= elf.entry < s.end for s in elf.segments)
    assert elf.start >= bz.header.pref_address
    m = GuestMemory([Region(0, 512 * layout.MiB, MmapBackend(512 * layout.MiB, hugepages=False))])
    try:
        plan = load_linux(m, data, "console=ttyS0", initrd=b"\0" * 4096)
        assert plan.entry_rip == elf.entry and plan.description["compression"] == kind
        seg = elf.segments[0]
        assert m.read(seg.paddr, 4096) == vmlinux[seg.offset:seg.offset + 4096]
    finally:
        m.close()


# --- fuzzing: every bad input is a BootError with one line ---------------------------------------

FUZZ_IMAGE = image("gzip", init_size=SMALL_INIT)
FUZZ_MEM = GuestMemory.for_test(32 * layout.MiB)
PAYLOAD_END = 5 * 512 + 0x200 + len(compress(VMLINUX, "gzip"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_or_booterror(data: bytes, decompress=True):
    try:
        load_linux(FUZZ_MEM, data, "console=ttyS0", initrd=b"i" * 100, decompress=decompress)
    except BootError as e:
        one_line(e)
        return False
    return True


def test_fuzz_image_loads():
    assert _load_or_booterror(FUZZ_IMAGE)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    with pytest.raises(BootError) as e:
        parse_bzimage(data)
    one_line(e.value)
    _load_or_booterror(data)


@FUZZ
@given(st.integers(0, len(FUZZ_IMAGE) - 1))
def test_truncation_at_any_length(n):
    ok = _load_or_booterror(FUZZ_IMAGE[:n])
    assert ok == (n >= PAYLOAD_END)


@FUZZ
@given(st.sampled_from([0x1f1, 0x1fe, 0x1ff, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x236]),
       st.integers(1, 255))
def test_flipped_magic_and_version_bytes(offset, xor):
    data = bytearray(FUZZ_IMAGE)
    data[offset] ^= xor
    ok = _load_or_booterror(bytes(data))
    if offset in (0x1fe, 0x1ff, 0x202, 0x203, 0x204, 0x205):
        assert not ok


@FUZZ
@given(st.integers(0, 0x020b))
def test_too_old_version(version):
    with pytest.raises(BootError, match="older than 2.12"):
        parse_bzimage(_patched(FUZZ_IMAGE, 0x206, "<H", version))


@FUZZ
@given(st.integers(64, 255))
def test_bad_setup_sects(sects):
    with pytest.raises(BootError, match="setup_sects"):
        parse_bzimage(_patched(FUZZ_IMAGE, 0x1f1, "<B", sects))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(FUZZ_IMAGE) - 1), st.integers(1, 255)),
                min_size=1, max_size=8),
       st.booleans())
def test_random_corruption_anywhere(flips, decompress):
    data = bytearray(FUZZ_IMAGE)
    for offset, xor in flips:
        data[offset] ^= xor
    _load_or_booterror(bytes(data), decompress)


@FUZZ
@given(st.integers(0, 0xffff_ffff), st.integers(0, 0xffff_ffff), st.integers(0, (1 << 64) - 1))
def test_random_layout_fields(payload_offset, init_size, pref_address):
    data = _patched(FUZZ_IMAGE, 0x248, "<I", payload_offset)
    data = _patched(data, 0x260, "<I", init_size)
    data = _patched(data, 0x258, "<Q", pref_address)
    assume(data != FUZZ_IMAGE)
    _load_or_booterror(data, decompress=False)
    _load_or_booterror(data, decompress=True)
