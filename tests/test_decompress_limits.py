"""Payload decompression is capped: a small bzImage that inflates to GiBs is refused, not unpacked.

The oracle is the size of what was compressed, not the decoder's code; the RSS tests measure a
separate process's peak resident memory against a baseline process in the same test."""

import os
import subprocess
import sys
import textwrap
import zlib

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import needs_kvm
from pykvm.boot import BootError, decompress_payload
from pykvm.boot.decompress import _MAGICS, LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC, MAX_VMLINUX
from pykvm.testing.synthetic import compress, make_bzimage

KINDS = ["gzip", "bzip2", "xz", "lzma", "lz4", "zstd"]
MiB = 1 << 20


@pytest.mark.parametrize("kind", KINDS + ["none"])
def test_limit_is_exact(kind):
    """Output of exactly `limit` bytes is fine; one byte less of limit is refused."""
    data = b"\x7fELF" + os.urandom(1000) + bytes(3 * MiB)
    payload = compress(data, kind)
    assert decompress_payload(payload, limit=len(data)) == (kind, data)
    with pytest.raises(BootError, match="more than"):
        decompress_payload(payload, limit=len(data) - 1)


def lz4_bomb(total: int) -> bytes:
    """A legacy LZ4 frame of `total` bytes of zeros: one 8 MiB block, repeated (a few KiB each)."""
    block = lz4.block.compress(bytes(LZ4_LEGACY_BLOCK), store_size=False)
    n = total // LZ4_LEGACY_BLOCK
    return (LZ4_LEGACY_MAGIC.to_bytes(4, "little")
            + (len(block).to_bytes(4, "little") + block) * n + total.to_bytes(4, "little"))


def zstd_bomb(total: int) -> bytes:
    c = zstandard.ZstdCompressor(level=1).compressobj()
    zero = bytes(64 * MiB)
    out = [c.compress(zero) for _ in range(total // len(zero))]
    return b"".join(out) + c.flush()


def gzip_bomb(total: int) -> bytes:
    c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zero = bytes(64 * MiB)
    return b"".join(c.compress(zero) for _ in range(total // len(zero))) + c.flush()


BOMBS = {"lz4": lz4_bomb, "zstd": zstd_bomb, "gzip": gzip_bomb}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_bomb_is_refused_with_bounded_rss(tmp_path, kind):
    """A bzImage of a few MiB whose payload is 1.5 GiB of zeros: one-line BootError, and the
    decompressing process's peak RSS stays far below what unpacking it would take."""
    payload = BOMBS[kind](MAX_VMLINUX * 3)
    assert len(payload) < 16 * MiB
    image = tmp_path / "bomb.bzImage"
    image.write_bytes(make_bzimage(payload))
    script = textwrap.dedent(f"""
        import resource, sys
        from pykvm.boot import BootError, parse_bzimage, decompress_payload
        data = open({str(image)!r}, "rb").read()
        bz = parse_bzimage(data)
        if sys.argv[1] == "decompress":
            try:
                decompress_payload(bz.payload)
                print("DECOMPRESSED")
            except BootError as e:
                print("ERROR", e)
        print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)

    def run(mode):
        p = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
        return lines, int(lines["RSS"]) * 1024

    base, base_rss = run("baseline")
    got, rss = run("decompress")
    assert "ERROR" in got and "more than" in got["ERROR"] and "\n" not in got["ERROR"], got
    # The limit itself (512 MiB) plus slack; unpacking the bomb would need 1.5 GiB.
    assert rss - base_rss < MAX_VMLINUX + 128 * MiB, (rss >> 20, base_rss >> 20)


@needs_kvm
def test_bomb_through_the_cli(tmp_path):
    image = tmp_path / "bomb.bzImage"
    image.write_bytes(make_bzimage(lz4_bomb(MAX_VMLINUX * 2)))
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "boot", str(image), "--console", "none"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "decompresses to more than 512 MiB" in p.stderr


# ---- fuzz: any bytes after any magic: a payload or one BootError, never another exception ----

@settings(max_examples=300, deadline=None)
@given(st.sampled_from([m for m, _ in _MAGICS]), st.binary(max_size=600),
       st.integers(min_value=1, max_value=1 << 16))
def test_decoders_on_garbage(magic, body, limit):
    try:
        kind, out = decompress_payload(magic + body, limit=limit)
    except BootError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert 0 < len(out) <= limit


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(KINDS), st.binary(min_size=1, max_size=3000), st.data())
def test_decoders_on_flipped_bytes(kind, data, draw):
    """A real stream of `data` with one byte changed decodes to something of bounded size or
    fails with one BootError line; unchanged, it gives `data` back exactly."""
    payload = compress(data, kind)
    assert decompress_payload(payload) == (kind, data)
    i = draw.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    bad = bytearray(payload)
    bad[i] ^= draw.draw(st.integers(min_value=1, max_value=255))
    try:
        _, out = decompress_payload(bytes(bad), limit=1 << 20)
    except BootError as e:
        assert "\n" not in str(e)
    else:
        assert len(out) <= 1 << 20
