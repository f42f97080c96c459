"""DiskImage's scatter-gather paths (what virtio-blk uses to read into guest RAM without copies)."""

import os

from hypothesis import given, settings, strategies as st

from pykvm.host.disk import DiskImage


def make_image(tmp_path, size=64 * 1024):
    path = tmp_path / "disk.img"
    data = os.urandom(size)
    path.write_bytes(data)
    return path, data


def split(buf: bytearray, cuts: list[int]) -> list[memoryview]:
    view, out, pos = memoryview(buf), [], 0
    for cut in sorted(set(c % (len(buf) + 1) for c in cuts)) + [len(buf)]:
        out.append(view[pos:cut])
        pos = cut
    return [v for v in out if len(v)]


@settings(max_examples=30, deadline=None)
@given(offset=st.integers(0, 60 * 1024), n=st.integers(1, 4096), cuts=st.lists(st.integers(0, 4096), max_size=6),
       snapshot=st.booleans())
def test_readinto_matches_the_file(tmp_path_factory, offset, n, cuts, snapshot):
    path, data = make_image(tmp_path_factory.mktemp("d"))
    n = min(n, len(data) - offset)
    with DiskImage(path, snapshot=snapshot) as disk:
        if snapshot:
            disk.write(0, b"\xaa" * 100)            # an overlay chunk in play
            data = b"\xaa" * 100 + data[100:]
        buf = bytearray(n)
        disk.readinto(offset, split(buf, cuts))
    assert bytes(buf) == data[offset:offset + n]


def test_writefrom_lands_in_order(tmp_path):
    path, data = make_image(tmp_path)
    parts = [memoryview(b"abc"), memoryview(b"defgh"), memoryview(b"i")]
    with DiskImage(path) as disk:
        disk.writefrom(1000, parts)
        disk.flush()
    assert path.read_bytes()[1000:1009] == b"abcdefghi"


def test_writefrom_under_snapshot_leaves_the_file(tmp_path):
    path, data = make_image(tmp_path)
    with DiskImage(path, snapshot=True) as disk:
        disk.writefrom(0, [memoryview(b"xyz")])
        out = bytearray(3)
        disk.readinto(0, [memoryview(out)])
        assert out == b"xyz"
    assert path.read_bytes() == data
