"""Default assets for pykvm's tests and CLI: kernels, an initramfs and a disk image.

::

    from pykvm.assets import test_kernel, cloud_kernel, initramfs, disk_image
    k = test_kernel()          # TestKernel(bzimage=Path, vmlinux=Path, config=Path, release=str)
    cloud_kernel()             # Path: Debian's linux-image-cloud-amd64 vmlinuz (bzImage)
    initramfs()                # Path: busybox initramfs.cpio (compress=True: .cpio.gz)
    initramfs(tiny=True)       # Path: just a 200-byte /init that prints the marker and powers off
    disk_image()               # Path: 64 MiB raw ext4 with the same busybox root

Everything is built or fetched on first use and cached outside the repo
(``$PYKVM_CACHE``, default ``~/.cache/pykvm``) under a key of its inputs, so
later calls only check that the files are there. ``python -m pykvm.assets``
does the same from a shell. Failures raise :class:`AssetError` with a one-line
message naming the fix.

How it is done:

1. ``debian``: Debian packages through apt-get/apt-cache/dpkg-deb (download
   without installing; install the kernel build dependencies when root).
2. ``cpio``: the cpio "newc" format, with ``construct``.
3. ``userland``: busybox-static into an initramfs whose /init prints
   :data:`USERLAND_MARKER` and powers off on ``pykvm.poweroff``.
   ``tinyinit``: that 200-byte /init, an ELF written byte by byte.
4. ``disk``: the same tree as an ext4 image via ``mke2fs -d``.
5. ``kernel``: Debian's linux-source-6.1, ``tinyconfig`` + ``pykvm-6.1.config``.
6. ``cloud``: Debian's cloud kernel as shipped.
7. ``cache``: keys, atomic writes.
"""

import importlib

# The names below load their module on first use: `from pykvm.assets.cache import cache_root`
# (firmware builds, the lane) must not pay for construct, apt and the kernel build code.
_HOME = {
    "cache_root": "cache", "cloud_kernel": "cloud", "DISK_MARKER": "disk", "disk_image": "disk",
    "AssetError": "errors", "TestKernel": "kernel", "test_kernel": "kernel",
    "POWEROFF_ARG": "userland", "REBOOT_ARG": "userland", "USERLAND_MARKER": "userland",
    "initramfs": "userland",
}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'pykvm.assets' has no attribute {name!r}")


__all__ = [
    "AssetError", "DISK_MARKER", "POWEROFF_ARG", "REBOOT_ARG", "TestKernel", "USERLAND_MARKER",
    "cache_root", "cloud_kernel", "disk_image", "initramfs", "test_kernel",
]
