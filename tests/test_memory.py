import pytest
from hypothesis import given, strategies as st

from pykvm.memory import BytesBackend, GuestMemory, GuestMemoryError, Region


def two_regions():
    # RAM below and above a hole, as pykvm lays out memory around the PCI hole.
    return GuestMemory([Region(0, 0x1000, BytesBackend(0x1000)),
                        Region(0x3000, 0x1000, BytesBackend(0x1000))])


def test_round_trip_and_int_helpers():
    mem = GuestMemory.for_test(0x2000)
    mem.write(0x10, b"hello")
    assert mem.read(0x10, 5) == b"hello"
    mem.write_int(0x100, 4, 0x12345678)
    assert mem.read(0x100, 4) == bytes([0x78, 0x56, 0x34, 0x12])
    assert mem.read_int(0x100, 2) == 0x5678


def test_view_is_zero_copy():
    mem = GuestMemory.for_test(0x1000)
    v = mem.view(0x20, 4)
    v[:] = b"abcd"
    assert mem.read(0x20, 4) == b"abcd"


@pytest.mark.parametrize("gpa,size", [(0xfff, 2), (0x1000, 1), (0x2fff, 1), (0x3fff, 2),
                                      (0x4000, 1), (-1, 1), (0, -1), (0xffc, 0x2008)])
def test_out_of_bounds_is_refused(gpa, size):
    mem = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, size)
    if size >= 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"x" * size)


def test_access_may_not_straddle_regions_even_if_adjacent():
    mem = GuestMemory([Region(0, 0x1000, BytesBackend(0x1000)),
                       Region(0x1000, 0x1000, BytesBackend(0x1000))])
    mem.write(0xffe, b"ab")
    with pytest.raises(GuestMemoryError):
        mem.read(0xfff, 2)


def test_overlapping_regions_rejected():
    with pytest.raises(ValueError):
        GuestMemory([Region(0, 0x2000, BytesBackend(0x2000)),
                     Region(0x1000, 0x1000, BytesBackend(0x1000))])


@given(gpa=st.integers(-10, 0x5000), size=st.integers(0, 0x2100))
def test_bounds_check_agrees_with_contains(gpa, size):
    mem = two_regions()
    inside = gpa >= 0 and mem.contains(gpa, size)
    try:
        data = mem.read(gpa, size)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside and len(data) == size


def test_views_and_locate_check_every_range():
    mem = two_regions()
    a, b = mem.views([(0x10, 4), (0x3000, 2)])
    a[:] = b"abcd"
    b[:] = b"xy"
    assert mem.read(0x10, 4) == b"abcd" and mem.read(0x3000, 2) == b"xy"
    with pytest.raises(GuestMemoryError):
        mem.views([(0x10, 4), (0xfff, 2)])
    view, off = mem.locate(0x3004, 8)
    assert off == 4 and len(view) == 0x1000
    with pytest.raises(GuestMemoryError):
        mem.locate(0x2fff, 2)


@given(gpa=st.integers(-10, 0x5000), size=st.integers(-2, 0x2100))
def test_views_bounds_check_agrees_with_contains(gpa, size):
    mem = two_regions()
    inside = gpa >= 0 and size >= 0 and mem.contains(gpa, size)
    try:
        [v] = mem.views([(gpa, size)])
    except GuestMemoryError:
        assert not inside
    else:
        assert inside and len(v) == size


@pytest.mark.parametrize("mib", [1, 3, 16, 23, 35])
def test_mmap_backend_starts_guest_ram_on_a_huge_page_boundary(mib):
    """KVM maps guest 2 MiB pages with host ones only when the slot's host address agrees with its
    guest-physical one modulo 2 MiB; whatever the length, the RAM must start on a boundary."""
    from pykvm.memory import MmapBackend
    b = MmapBackend(mib << 20, hugepages=True)
    try:
        assert b.address() % (2 << 20) == 0
        v = b.view()
        assert len(v) == mib << 20
        v[0], v[-1] = 1, 2          # the whole range is mapped and writable
        assert (v[0], v[-1]) == (1, 2)
    finally:
        b.close()
