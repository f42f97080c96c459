"""The asset cache: one directory per asset and per set of inputs.

Layout::

    $PYKVM_CACHE (default ~/.cache/pykvm)/
        <asset>/<key>/          a finished asset (never modified afterwards)
            inputs.json         what went into it, readable by people
            ...                 the asset's files
        <asset>/.tmp-XXXX/      a build in progress (removed on failure)

``key`` is the first 16 hex digits of a SHA-256 over the asset's inputs: the
Debian package names and versions, the bytes of the config fragment or init
script, and a recipe version bumped whenever the code that builds the asset
changes what it produces. Change any input and the asset is rebuilt into a new
directory; old directories are simply left behind (``rm -rf`` the cache to
reclaim them).

Writes are atomic: an asset is built in a temporary sibling directory and
renamed into place only when complete, so a crash or Ctrl-C never leaves a
half-built asset that a later run would trust. A process building an asset
holds an exclusive ``flock`` on ``<asset>/.<key>.lock``; another process
wanting the same asset waits for it and then finds it built (the test kernel
takes minutes, and two builds in one object tree would clobber each other).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import AssetError

InputValue = str | bytes | int


def cache_root() -> Path:
    """``$PYKVM_CACHE`` if set, else ``~/.cache/pykvm`` (outside any repo)."""
    env = os.environ.get("PYKVM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pykvm"


def cache_key(asset: str, inputs: Mapping[str, InputValue]) -> str:
    """A stable hash of an asset's name and inputs (order of ``inputs`` does not matter).

    Each input is hashed with its name, type and length, so ``{"a": "bc"}``
    and ``{"ab": "c"}`` cannot collide, nor ``"1"`` and ``1``.
    """
    h = hashlib.sha256()

    def feed(tag: bytes, data: bytes) -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)

    feed(b"A", asset.encode())
    for name in sorted(inputs):
        value = inputs[name]
        feed(b"N", name.encode())
        if isinstance(value, bytes):
            feed(b"B", value)
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"cache input {name!r} must be str, bytes or int, not {type(value).__name__}")
        elif isinstance(value, int):
            feed(b"I", str(value).encode())
        else:
            feed(b"S", value.encode())
    return h.hexdigest()[:16]


def _describe(inputs: Mapping[str, InputValue]) -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    for name, value in sorted(inputs.items()):
        if isinstance(value, bytes):
            out[name] = f"sha256:{hashlib.sha256(value).hexdigest()} ({len(value)} bytes)"
        else:
            out[name] = value
    return out


def entry_dir(asset: str, inputs: Mapping[str, InputValue], root: Path | None = None) -> Path:
    """Where the asset with these inputs lives (whether or not it exists yet)."""
    return (root or cache_root()) / asset / cache_key(asset, inputs)


def cached(asset: str, inputs: Mapping[str, InputValue], build: Callable[[Path], None],
           root: Path | None = None) -> Path:
    """Return the directory of a finished asset, calling ``build(tmpdir)`` first if needed.

    ``build`` fills the empty directory it is given; if it raises, the
    directory is removed and the exception propagates.
    """
    final = entry_dir(asset, inputs, root)
    if final.is_dir():
        return final
    from ..lane.runner import INNER_ENV
    if os.environ.get(INNER_ENV):
        # In the AMD-V lane the cache is the host's, read-only, and building under QEMU's emulator
        # would take ages (the test kernel: hours): say at once what is missing, and where to build it.
        raise AssetError(f"asset {asset} ({final.name}) is not in the cache, which is read-only in the "
                         "AMD-V lane: build it on the host before the lane starts (python -m pykvm.assets)")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = open(parent / f".{final.name}.lock", "a")
    except OSError as e:
        raise AssetError(f"cannot create cache directory {parent}: {e.strerror}; "
                         "set PYKVM_CACHE to a writable directory") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"pykvm: [{asset}] waiting for another process building it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # built by the process we waited for
            return final
        _build_into(final, asset, inputs, build)
    return final


def _build_into(final: Path, asset: str, inputs: Mapping[str, InputValue],
                build: Callable[[Path], None]) -> None:
    parent = final.parent
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; finished assets are readable by all
        build(tmp)
        (tmp / "inputs.json").write_text(json.dumps(
            {"asset": asset, "key": final.name, "inputs": _describe(inputs)}, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
