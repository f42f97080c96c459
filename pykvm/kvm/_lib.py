"""The compiled cffi module, and the one helper every ioctl goes through.

This is the only module that imports `pykvm._kvm_cffi`. If it is missing, pykvm was not installed
(the extension is compiled at install time against the kernel headers).
"""

from __future__ import annotations

try:
    from pykvm._kvm_cffi import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "pykvm's KVM binding is not built: run `pip install -e .` (needs gcc and linux-libc-dev), "
        f"or `python csrc/build_ffi.py` in a checkout ({e})") from None

from .errors import KvmError

__all__ = ["ffi", "lib", "ioctl", "ioctl_int", "ioctl_new", "buffer_address"]


def ioctl(fd: int, request: int, arg, name: str) -> int:
    """ioctl with a pointer argument (a cffi object or NULL); raise KvmError naming `name` on failure."""
    r = lib.pykvm_ioctl(fd, request, arg)
    if r < 0:
        raise KvmError(-r, name)
    return r


def ioctl_int(fd: int, request: int, arg: int, name: str) -> int:
    """ioctl with an integer argument (or none)."""
    r = lib.pykvm_ioctl_int(fd, request, arg)
    if r < 0:
        raise KvmError(-r, name)
    return r


def ioctl_new(fd: int, name: str, ctype: str, init=None):
    """The shape of most KVM_GET_* ioctls: a new `ctype` struct (fields from `init`, else zeroed)
    handed to ioctl `name` (the constant's name in <linux/kvm.h>), and returned as KVM filled it."""
    obj = ffi.new(ctype) if init is None else ffi.new(ctype, init)
    ioctl(fd, getattr(lib, name), obj, name)
    return obj


def buffer_address(buf) -> int:
    """The host virtual address of a writable buffer (an mmap of guest RAM), for
    KVM_SET_USER_MEMORY_REGION. cffi borrows the buffer only for the moment it takes to read the
    address (ctypes would do the same, at the cost of importing ctypes at start-up)."""
    c = ffi.from_buffer(buf, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", c))
    finally:
        ffi.release(c)
