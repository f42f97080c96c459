"""Shared test fixtures. Tests that need /dev/kvm use the `kvm` fixture or the `needs_kvm` mark,
and skip - naming the reason - only where /dev/kvm is absent or unusable."""

import os
import signal

import pytest


def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


# For a whole module: pytestmark = [*KVM_MARKS, ...]
KVM_MARKS = [pytest.mark.kvm,
             pytest.mark.skipif(kvm_unusable_reason() is not None, reason=kvm_unusable_reason() or "")]


def needs_kvm(test):
    """Mark a test as running a guest on /dev/kvm: `-m "not kvm"` deselects it, and it skips,
    naming the reason, where /dev/kvm is unusable."""
    reason = kvm_unusable_reason()
    test = pytest.mark.kvm(test)
    return pytest.mark.skipif(reason is not None, reason=reason or "")(test)


def pytest_configure(config):
    # @pytest.mark.amdv: tests that need guest userland run directly on VT-x/AMD-V hosts and in the
    # AMD-V lane (QEMU TCG) elsewhere (pykvm/lane/pytest_plugin.py).
    config.pluginmanager.import_plugin("pykvm.lane.pytest_plugin")


def pytest_collection_modifyitems(items):
    for item in items:
        if "kvm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kvm)


@pytest.fixture
def kvm():
    reason = kvm_unusable_reason()
    if reason:
        pytest.skip(reason)
    from pykvm.kvm import Kvm
    with Kvm() as k:
        yield k


def default_sigint() -> None:
    """`preexec_fn` for a child process the test will Ctrl-C: SIGINT back to its default action. A
    shell that starts a job in the background (nohup, `cmd &` in a script, some CI runners) starts
    it with SIGINT ignored, its children inherit that, and a Python started so never turns SIGINT
    into KeyboardInterrupt (nohup's point): the test's Ctrl-C would be lost and the child would run
    on. Seen here: a fresh-clone `./run test` started with `&` hung in both Ctrl-C tests."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def kernel():
    """The test kernel's files (pykvm.assets.test_kernel: .bzimage, .vmlinux), built or cached.
    A module that wants something else under this name defines its own."""
    from pykvm.assets import test_kernel
    return test_kernel()


@pytest.fixture(scope="session")
def rootfs():
    """The busybox initramfs (pykvm.assets.initramfs)."""
    from pykvm.assets import initramfs
    return initramfs()


class Recorder:
    """A port device for tests: remembers every byte written, reads as 0."""

    def __init__(self):
        self.data = bytearray()

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.data.append(value)


def load_real_mode(machine, code: bytes) -> None:
    """Put a real-mode program at 0x1000 and point vCPU 0 at it (CS=0x100, IP=0), for the tiny
    hand-assembled guests of the KVM tests."""
    from pykvm.x86.cpu import setup_real_mode
    machine.mem.write(0x1000, code)
    setup_real_mode(machine.vcpu, 0x100, 0)


def boot_expecting(vm, patterns, timeout: float) -> dict:
    """Start `vm`, wait for each console pattern in turn (the last is usually the kernel's "Run
    /init"), and stop it; returns its stats as they were at the last match."""
    vm.start(timeout=timeout)
    for pattern in patterns:
        vm.console.expect(pattern, timeout=timeout)
    stats = vm.stats
    vm.stop()
    return stats


_XSETBV_REACHES_KVM: list = []   # the probe's answer, once per process: the host does not change


def assert_no_kernel_warnings(console: str) -> None:
    """The guest kernel reported no WARN, BUG, oops, panic or stall in `console` - but for the
    one QEMU's TCG causes in every lane boot, tolerated only where a probe guest shows, on this
    host, that a guest's XSETBV does not reach KVM (pykvm/lane/tcg.py)."""
    from pykvm.lane.tcg import unexpected_splats, xsetbv_reaches_kvm
    if not _XSETBV_REACHES_KVM:
        _XSETBV_REACHES_KVM.append(xsetbv_reaches_kvm())
    splats = unexpected_splats(console, xsetbv_reaches_kvm=_XSETBV_REACHES_KVM[0])
    assert splats == [], "the guest kernel reported:\n" + "\n".join("\n".join(s.lines)
                                                                  for s in splats)


def assert_clean_ext4(image) -> None:
    """`e2fsck -fn`: the image is a consistent ext4 filesystem (nothing to fix, nothing changed)."""
    import shutil
    import subprocess
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    p = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
