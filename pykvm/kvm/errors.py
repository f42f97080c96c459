"""Errors from the KVM binding."""

from __future__ import annotations

import errno
import os


class KvmError(OSError):
    """A KVM ioctl failed. Carries the ioctl's name and errno: `KvmError(EINVAL, "KVM_SET_SREGS")`."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what

    def __str__(self) -> str:
        return f"{self.what} failed: {os.strerror(self.errno)} (errno {errno.errorcode.get(self.errno, self.errno)})"


class KvmUnavailable(Exception):
    """/dev/kvm is missing or unusable; the message says how to fix it (one line, for the CLI)."""
