"""The --snapshot overlay: a sparse temporary file and a bitmap, checked against a bytearray model
of the disk (the oracle is plain slicing, not the overlay's code)."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.host.disk import DiskImage
from pykvm.host.overlay import CHUNK, Overlay

SIZE = 5 * CHUNK + 1536          # not a whole number of chunks: the last one is short


def _image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "disk.img"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return path, data


ops = st.lists(st.tuples(st.booleans(), st.integers(0, SIZE - 1), st.integers(0, 3 * CHUNK),
                         st.binary(min_size=1, max_size=1)), max_size=25)


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_snapshot_disk_matches_a_bytearray_model(tmp_path_factory, ops):
    path, original = _image(tmp_path_factory)
    model = bytearray(original)
    with DiskImage(path, snapshot=True) as disk:
        for is_write, offset, n, fill in ops:
            n = min(n, SIZE - offset)
            if is_write:
                data = (fill * n)[:n]
                disk.write(offset, data)
                model[offset:offset + n] = data
            else:
                assert disk.read(offset, n) == bytes(model[offset:offset + n])
        assert disk.read(0, SIZE) == bytes(model)
        buffers = [memoryview(bytearray(k)) for k in (100, CHUNK, SIZE - CHUNK - 100)]
        disk.readinto(0, buffers)
        assert b"".join(bytes(b) for b in buffers) == bytes(model)
        # What a VM snapshot saves: exactly the written chunks; loaded into a fresh overlay over
        # the same image they give the same disk.
        saved = list(disk.overlay.chunks())
        touched = set()
        for is_write, offset, n, _ in ops:
            n = min(n, SIZE - offset)
            if is_write and n:
                touched.update(range(offset // CHUNK, (offset + n - 1) // CHUNK + 1))
        assert {o // CHUNK for o, _ in saved} == touched
        again = Overlay(SIZE, lambda o, k: original[o:o + k])
        for offset, data in saved:
            again.load(offset, data)
        assert again.read(0, SIZE) == bytes(model)
        again.close()
    assert path.read_bytes() == original                # the image itself never changed


def test_overlay_is_a_sparse_unlinked_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_OVERLAY_DIR", str(tmp_path))
    size = 1 << 30                                      # 1 GiB of disk, almost none of it written
    ov = Overlay(size, lambda o, n: bytes(n))
    assert list(tmp_path.iterdir()) == []               # unlinked at once: nothing left behind
    ov.write(123 * CHUNK, b"x" * CHUNK)
    st_ = os.fstat(ov.fd)
    assert st_.st_size == size and st_.st_blocks * 512 < 1 << 20
    assert ov.written == 1 and len(ov._bits) <= size // CHUNK // 8 + 1
    ov.close()


def test_an_overlay_folder_that_cannot_be_used_is_a_one_line_input_error(tmp_path, monkeypatch):
    """PYKVM_OVERLAY_DIR missing, or a file: `pykvm boot ... --snapshot` exits 2 with one line
    naming the folder and the fix (it was a FileNotFoundError traceback, status 1)."""
    import pytest
    from pykvm.cli_checks import InputError
    (tmp_path / "a-file").write_bytes(b"")
    for folder in (tmp_path / "missing", tmp_path / "a-file"):
        monkeypatch.setenv("PYKVM_OVERLAY_DIR", str(folder))
        with pytest.raises(InputError) as e:
            Overlay(CHUNK, lambda offset, n: bytes(n))
        assert str(e.value).startswith(f"cannot create the --snapshot overlay in {folder}: ")
        assert str(e.value).endswith("; set PYKVM_OVERLAY_DIR to a writable folder")
        assert "\n" not in str(e.value)
