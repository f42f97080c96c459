"""The split virtqueue against malformed and well-formed descriptor chains, with no guest."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.memory import GuestMemory, GuestMemoryError
from pykvm.virtio.mock import GuestAllocator, MockQueue
from pykvm.virtio.queue import VIRTQ_DESC_F_NEXT, ChainError, VirtQueue

RAM = 64 * 1024


def make(size=8, indirect=True, ram=RAM, mem=None, alloc_end=None):
    """A live queue of `size` in `mem` (a fresh test RAM of `ram` bytes if None), its driver side
    allocated between 0x100 and `alloc_end` (the end of RAM if None)."""
    mem = GuestMemory.for_test(ram) if mem is None else mem
    alloc = GuestAllocator(mem, 0x100, ram if alloc_end is None else alloc_end)
    mq = MockQueue(mem, size, alloc)
    q = VirtQueue(size)
    q.mem = mem
    q.indirect = indirect
    q.desc_addr, q.avail_addr, q.used_addr = mq.desc_addr, mq.avail_addr, mq.used_addr
    assert q.check(mem) is None
    q.ready = True
    return mem, mq, q


def test_simple_chain_round_trip():
    mem, mq, q = make()
    head = mq.add_chain([b"hello", b"world"], [3, 4])
    c = q.pop()
    assert c.head == head
    assert c.read() == b"helloworld"
    assert c.read(3, 4) == b"lowo"
    assert c.writable_len == 7
    c.write(2, b"xyzab")
    q.add_used(c.head, 7)
    assert q.pop() is None
    assert mq.take_used() == [(head, 7)]
    assert mq.written(head) == b"\xaa\xaaxyzab"


def test_indirect_chain():
    mem, mq, q = make()
    head = mq.add_chain([b"abc"], [5], indirect=True)
    c = q.pop()
    assert c.head == head and c.read() == b"abc" and c.writable_len == 5


def test_indirect_refused_without_feature():
    mem, mq, q = make(indirect=False)
    head = mq.add_chain([b"abc"], [5], indirect=True)
    assert q.pop() is None
    assert q.errors == 1
    assert mq.take_used() == [(head, 0)]


def test_loop_is_dropped_and_counted():
    mem, mq, q = make()
    mq.set_desc(0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1)
    mq.set_desc(1, 0x8000, 16, VIRTQ_DESC_F_NEXT, 0)
    mq.publish(0)
    mq.next_free = 2
    good = mq.add_chain([b"ok"], [])
    c = q.pop()
    assert c.head == good            # the next, well-formed chain still gets through
    assert q.errors == 1 and q.error_kinds["malformed chain"] == 1
    assert mq.take_used() == [(0, 0)]


def test_next_out_of_table_and_head_out_of_range():
    mem, mq, q = make()
    mq.set_desc(2, 0x8000, 16, VIRTQ_DESC_F_NEXT, 8)   # next == size: outside the table
    mq.publish(2)
    mq.publish(99)                                     # not a descriptor at all
    assert q.pop() is None
    assert q.errors == 2
    assert mq.take_used() == [(2, 0)]                  # 99 cannot be returned


def test_readable_after_writable_is_malformed():
    mem, mq, q = make()
    mq.add_segments([(0x8000, 4, True), (0x8010, 4, False)])
    assert q.pop() is None
    assert q.errors == 1


def test_buffer_outside_ram_raises_chain_error_and_counts():
    mem, mq, q = make()
    head = mq.add_segments([(RAM - 2, 4, False), (0x8000, 1, True)])
    c = q.pop()
    with pytest.raises(ChainError):
        c.read()
    assert q.errors == 1
    c.write(0, b"\x01")                               # the in-RAM part is still usable
    assert c.head == head


def test_avail_index_jump_breaks_queue():
    mem, mq, q = make()
    mq.set_avail_idx(100)
    assert q.pop() is None
    assert q.broken and q.errors == 1


def test_bad_queue_configs_are_rejected():
    mem = GuestMemory.for_test(RAM)
    q = VirtQueue(16)
    q.size = 12
    assert "power of two" in q.check(mem)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = 16, 0x1008, 0x2000, 0x3000
    assert "aligned" in q.check(mem)
    q.desc_addr = RAM - 16
    assert "not in RAM" in q.check(mem)
    with pytest.raises(ValueError):
        VirtQueue(3)


def test_wraparound_of_free_running_indices():
    mem, mq, q = make(size=4)
    mq.set_avail_idx(0xFFFE)
    mq.avail_idx = 0xFFFE
    q.last_avail = 0xFFFE
    q.next_used = 0xFFFE
    mq.last_used = 0xFFFE
    heads = [mq.add_chain([bytes([i])], []) for i in range(4)]
    got = []
    while (c := q.pop()) is not None:
        got.append(c.head)
        q.add_used(c.head, 0)
    assert got == heads
    assert [h for h, _ in mq.take_used()] == heads
    assert mq.used_idx() == 2


def test_no_interrupt_flag():
    mem, mq, q = make()
    assert q.needs_interrupt()
    mq.suppress_interrupts()
    assert not q.needs_interrupt()


# ---- fuzzing: random descriptor tables ----

class SpyMemory(GuestMemory):
    """GuestMemory that remembers every access it refused."""

    refused = 0

    def _find(self, gpa, size):
        try:
            return super()._find(gpa, size)
        except GuestMemoryError:
            self.refused += 1
            raise


desc_st = st.tuples(
    st.one_of(st.integers(0, RAM), st.integers(0, 2**64 - 1)),         # addr: in and out of RAM
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),            # len
    st.integers(0, 7),                                                   # NEXT|WRITE|INDIRECT
    st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))                # next


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(desc_st, min_size=8, max_size=8),
       heads=st.lists(st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)), max_size=12),
       avail_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_fuzz_descriptor_chains(table, heads, avail_idx):
    size = 8
    mem, mq, q = make(size, mem=SpyMemory([GuestMemory.for_test(RAM).regions[0]]),
                      alloc_end=0x1000)
    for i, d in enumerate(table):
        mq.set_desc(i, *d)
    for h in heads[:size]:
        mq.publish(h)
    if avail_idx is not None:
        mq.set_avail_idx(avail_idx)

    popped = 0
    while (c := q.pop()) is not None:
        popped += 1
        assert c.head < size
        # A chain is bounded: no more descriptors than the queue plus one indirect table.
        assert len(c.readable) + len(c.writable) <= size + 0xFFFF
        refused, errors = mem.refused, q.errors
        for part, fn in ((c.readable, lambda: c.read(0, min(c.readable_len, 4096))),
                         (c.writable, lambda: c.write(0, bytes(min(c.writable_len, 4096))))):
            try:
                fn()
            except ChainError:
                assert q.errors > errors      # every refusal became a counted guest error
        assert mem.refused - refused <= q.errors - errors
        q.add_used(c.head, 0)

    used = mq.take_used()
    assert all(h < size for h, _ in used)
    assert mq.used_idx() == q.next_used == len(used)
    if not q.broken:
        # Every avail entry was consumed: each either returned a chain, was dropped to the used
        # ring, or (head out of range) counted.
        consumed = q.last_avail
        assert consumed == (mq.avail_idx if avail_idx is None else avail_idx)
        assert len(used) + q.error_kinds["head index out of range"] == consumed
    else:
        assert q.errors >= 1


# ---- fuzzing against a reference walk, with indirect tables that hold fuzzed descriptors ----

import struct as _struct  # noqa: E402

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
INDIRECT_AT = 0x8000                 # where the fuzzed indirect tables live in guest RAM


def reference_walk(table, ram: bytes, head: int, indirect_ok: bool):
    """The chain at `head` by VIRTIO 1.2 2.7.4.2 and 2.7.5.3, written from the spec for this
    test: (readable, writable) lists of (addr, len), or None for a chain the device must refuse.
    A chain that visits more descriptors than its table has entries must repeat one (a loop)."""
    readable, writable = [], []
    descs, index, visited, in_indirect = table, head, 0, False
    while True:
        if index >= len(descs):
            return None                                   # next points outside the table
        visited += 1
        if visited > len(descs):
            return None                                   # a loop
        addr, length, flags, nxt = descs[index]
        if flags & F_INDIRECT:
            if not indirect_ok or in_indirect or flags & F_NEXT:
                return None                               # 2.7.5.3.1: none of these allowed
            if length == 0 or length % 16 or length // 16 > 32768:
                return None
            if addr + length > len(ram):
                return None                               # the table is not in RAM
            descs = [_struct.unpack_from("<QIHH", ram, addr + 16 * i) for i in range(length // 16)]
            index, visited, in_indirect = 0, 0, True
            continue
        if flags & F_WRITE:
            writable.append((addr, length))
        elif writable:
            return None                                   # 2.7.4.2: readable after writable
        else:
            readable.append((addr, length))
        if not flags & F_NEXT:
            return readable, writable
        index = nxt


@st.composite
def fuzz_desc(draw):
    """A descriptor, steered so that many are plausible: an INDIRECT one mostly points at the
    fuzzed table with a length that is a whole number of entries; next indices mostly land in a
    table, so chains through them are long, loop, or end."""
    flags = draw(st.integers(0, 7))
    if flags & F_INDIRECT and draw(st.integers(0, 3)):
        addr = draw(st.sampled_from([INDIRECT_AT, INDIRECT_AT + 16, INDIRECT_AT + 32]))
        length = 16 * draw(st.integers(0, 11))
    else:
        addr = draw(st.one_of(st.integers(0, RAM), st.sampled_from([INDIRECT_AT, RAM - 16]),
                              st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.sampled_from([0, 1, 16, 17, 512]), st.integers(0, 2**32 - 1)))
    nxt = draw(st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))
    return addr, length, flags, nxt


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(fuzz_desc(), min_size=8, max_size=8),
       indirect=st.lists(fuzz_desc(), min_size=0, max_size=10),
       heads=st.lists(st.integers(0, 7), min_size=1, max_size=8),
       indirect_ok=st.booleans())
def test_fuzz_chains_match_a_reference_walk(table, indirect, heads, indirect_ok):
    """Every chain the queue hands out is exactly the reference walk's; every chain the reference
    refuses is returned to the driver with length 0 and counted. Indirect tables are filled with
    fuzzed descriptors (the old fuzz left them all zero)."""
    size = 8
    mem, mq, q = make(size, indirect_ok, alloc_end=0x1000)
    for i, d in enumerate(table):
        mq.set_desc(i, *d)
    for i, d in enumerate(indirect):
        mem.write(INDIRECT_AT + 16 * i, _struct.pack("<QIHH", *d))
    for h in heads:
        mq.publish(h)
    ram = mem.read(0, RAM)
    for h in heads:
        expected = reference_walk([_struct.unpack("<QIHH", _struct.pack("<QIHH", *d))
                                   for d in table], ram, h, indirect_ok)
        errors = q.error_kinds["malformed chain"]
        assert q.pop_head() == h
        chain = q.chain_at(h)
        if expected is None:
            assert chain is None and q.error_kinds["malformed chain"] == errors + 1, h
            assert mq.take_used() == [(h, 0)]
        else:
            assert chain is not None, (h, expected)
            assert (chain.readable, chain.writable) == expected
            assert chain.readable_len == sum(n for _, n in expected[0])
            assert chain.writable_len == sum(n for _, n in expected[1])
            q.add_used(h, 0)
            mq.take_used()
