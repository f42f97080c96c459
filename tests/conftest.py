"""Shared test fixtures. Tests that need /dev/kvm use the `kvm` fixture or the `needs_kvm` mark,
and skip - naming the reason - only where /dev/kvm is absent or unusable."""

import os

import pytest


def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


needs_kvm = pytest.mark.skipif(kvm_unusable_reason() is not None,
                               reason=kvm_unusable_reason() or "")


@pytest.fixture
def kvm():
    reason = kvm_unusable_reason()
    if reason:
        pytest.skip(reason)
    from pykvm.kvm import Kvm
    with Kvm() as k:
        yield k
