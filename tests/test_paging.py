"""Identity-map page tables for 64-bit entry."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.memory import GuestMemory
from pykvm.x86 import layout, paging


@pytest.fixture(scope="module", params=[False, True], ids=["kernel", "user"])
def tables(request):
    mem = GuestMemory.for_test(1 * layout.MiB)
    mem.fill(0, mem.size, 0xFF)                   # stale garbage must be overwritten
    cr3 = paging.write_identity_map(mem, user=request.param)
    return mem, cr3, request.param


def entries(mem, gpa):
    return struct.unpack("<512Q", mem.read(gpa, 4096))


def test_cr3_and_table_places(tables):
    mem, cr3, _ = tables
    assert cr3 == layout.PML4
    pages = paging.identity_map_tables()
    assert sorted(pages) == [layout.PML4, layout.PDPT] + [layout.PD + i * 4096 for i in range(4)]
    assert layout.PD + 4 * 4096 <= layout.CMDLINE
    for gpa in pages:                             # no table overlaps the zero page or the stack
        assert not (gpa <= layout.ZERO_PAGE < gpa + 4096)
        assert not (gpa < layout.BOOT_STACK <= gpa + 4096)


def test_entry_format(tables):
    mem, _, user = tables
    us = 4 if user else 0
    pml4 = entries(mem, layout.PML4)
    assert pml4[0] == layout.PDPT | 0x3 | us and not any(pml4[1:])
    pdpt = entries(mem, layout.PDPT)
    assert pdpt[:4] == tuple(layout.PD + i * 4096 | 0x3 | us for i in range(4))
    assert not any(pdpt[4:])
    pd0 = entries(mem, layout.PD)
    assert pd0[0] == 0x83 | us                     # P | R/W | PS, physical 0
    assert pd0[1] == 0x200000 | 0x83 | us
    pd3 = entries(mem, layout.PD + 3 * 4096)
    assert pd3[511] == 0xffe00000 | 0x83 | us      # the last 2 MiB below 4 GiB
    for pd in range(4):
        for e in entries(mem, layout.PD + pd * 4096):
            assert e & paging.PTE_PS and e & 0x3 == 0x3 and not e & paging.PTE_XD
            assert bool(e & paging.PTE_USER) == user


@given(st.integers(0, 4 * layout.GiB - 1))
def test_identity_below_4g(tables, addr):
    mem, cr3, _ = tables
    assert paging.translate(mem, cr3, addr) == addr


@given(st.integers(4 * layout.GiB, (1 << 48) - 1))
def test_nothing_mapped_above_4g(tables, addr):
    mem, cr3, _ = tables
    assert paging.translate(mem, cr3, addr) is None
