"""Debian's cloud kernel (``linux-image-cloud-amd64``), unmodified.

A realistic, big distribution kernel: LZ4-compressed bzImage, modules not
used (virtio and ext4 are built in to Debian's cloud flavour). Only the
``boot/`` directory of the package is kept in the cache (vmlinuz, config,
System.map), not the ~100 MB of modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import debian
from .cache import cached
from .errors import AssetError
from .progress import Progress

METAPACKAGE = "linux-image-cloud-amd64"


def cloud_kernel(*, progress: Progress | None = None) -> Path:
    """Path of the cloud kernel's bzImage (``vmlinuz-6.1.0-NN-cloud-amd64``)."""
    progress = progress or Progress("cloud-kernel")
    package, version = debian.resolve_metapackage(METAPACKAGE, progress)

    def build(tmp: Path) -> None:
        unpacked = debian.fetch(package, version, tmp / "deb", progress)
        boot = unpacked / "boot"
        if not any(boot.glob("vmlinuz-*")):
            raise AssetError(f"{package} {version} has no /boot/vmlinuz-*; pykvm expects Debian's layout")
        for f in boot.iterdir():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(tmp / "deb")

    entry = cached("cloud-kernel", {"package": package, "version": version}, build)
    found = sorted(entry.glob("vmlinuz-*"))
    if not found:
        raise AssetError(f"cache entry {entry} has no vmlinuz; remove it and retry")
    return found[0]
