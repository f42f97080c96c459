"""An ext4 disk image holding the busybox test userland.

Made with ``mke2fs -t ext4 -d DIR`` (e2fsprogs), which copies a directory into
a fresh filesystem without mounting anything, so no root is needed. The
filesystem has no partition table: attach it as a whole disk and boot with
``root=/dev/vda`` (virtio-blk) or ``root=/dev/sda`` (ATA). The kernel runs
``/sbin/init``, a symlink to the same ``/init`` script as the initramfs.

Device nodes are left out (mke2fs -d copies them only if the directory has
them, which needs root); the kernel mounts devtmpfs on /dev by itself.

A file ``/etc/pykvm-disk`` contains :data:`DISK_MARKER`, so a test can check
that it really reads this disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import debian
from .cache import cached
from .cpio import CpioEntry
from .errors import AssetError
from .progress import Progress
from .userland import RECIPE_VERSION, applets, busybox, busybox_version, tree

DISK_RECIPE_VERSION = "2"  # 2: file times 0
DISK_MARKER = "pykvm test disk"
DEFAULT_SIZE_MIB = 64
LABEL = "pykvm-root"
# Fixed UUID and hash seed: the same inputs give the same filesystem layout.
_UUID = "5a1e7d15-0000-4000-8000-0000000b007e"


def materialize(entries: list[CpioEntry], root: Path) -> None:
    """Write archive entries as a real directory tree under ``root`` (no device nodes)."""
    for e in entries:
        path = root / e.name
        if e.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, e.mode & 0o7777)
        elif e.is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(e.data)
            os.chmod(path, e.mode & 0o7777)
        elif e.is_symlink:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(e.data.decode(), path)
        else:
            raise AssetError(f"cannot write {e.name} (mode {e.mode:o}) without root")
    # Timestamps from the archive (0), children before parents so that
    # writing a child does not bump its directory's mtime afterwards.
    for e in reversed(entries):
        os.utime(root / e.name, (e.mtime, e.mtime), follow_symlinks=False)


def disk_image(*, size_mib: int = DEFAULT_SIZE_MIB, progress: Progress | None = None) -> Path:
    """Path of a raw ext4 image (``root.ext4``) with the busybox userland."""
    progress = progress or Progress("disk")
    if shutil.which("mke2fs") is None and shutil.which("mke2fs", path="/sbin:/usr/sbin") is None:
        debian.ensure_host_packages(["e2fsprogs"], "make the ext4 test disk", progress)
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin") or "mke2fs"
    bb = busybox(progress)
    version = busybox_version()

    def build(tmp: Path) -> None:
        root = tmp / "root"
        entries = tree(bb.read_bytes(), applets(bb), device_nodes=False)
        entries.append(CpioEntry.file("etc/pykvm-disk", (DISK_MARKER + "\n").encode()))
        materialize(entries, root)
        image = tmp / "root.ext4"
        progress.say(f"mke2fs -t ext4 -d ({size_mib} MiB)")
        argv = [mke2fs, "-q", "-F", "-t", "ext4", "-L", LABEL, "-U", _UUID,
                "-E", f"root_owner=0:0,hash_seed={_UUID}", "-d", str(root), str(image), f"{size_mib}M"]
        proc = subprocess.run(argv, capture_output=True, text=True,
                              env={**os.environ, "E2FSPROGS_FAKE_TIME": "1", "SOURCE_DATE_EPOCH": "0"})
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AssetError(f"mke2fs failed (exit {proc.returncode}): {last[0]}")
        shutil.rmtree(root)

    inputs = {"busybox": version, "userland": RECIPE_VERSION, "recipe": DISK_RECIPE_VERSION,
              "size_mib": size_mib}
    return cached("disk", inputs, build) / "root.ext4"
