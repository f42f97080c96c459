"""pykvm leaves out the KVM-PVM arguments it would add that the kernel does not know (boot/params.py)."""

import pytest

from pykvm.boot import load_linux
from pykvm.boot.params import kernel_knows, unknown_keys
from pykvm.memory import GuestMemory
from pykvm.testing.synthetic import make_elf
from pykvm.x86 import layout

# Parameter names as Linux stores them: __setup's with "=", early_param's and module_param's
# (prefixed with the module name) without.
NAMES = b"\x90\x90audit=\0percpu_alloc\0cryptomgr.notests\0xnosmap\0psi_extra\0"


def test_names_followed_by_nul_or_equals_nul_are_known():
    assert kernel_knows(NAMES, "audit")
    assert kernel_knows(NAMES, "percpu_alloc")
    assert kernel_knows(NAMES, "cryptomgr.notests")
    assert not kernel_knows(NAMES, "psi")              # only a longer name starts with it
    assert not kernel_knows(NAMES, "noxsave")
    # A name that ends another string counts as known: a false "knows" only keeps an argument.
    assert kernel_knows(NAMES, "nosmap")
    assert unknown_keys(NAMES, ["psi", "audit", "noxsave"]) == ["psi", "noxsave"]


def test_a_name_the_kernel_says_it_ignores_counts_as_unknown():
    blacklist = b"\0initcall_blacklist=\0"
    assert kernel_knows(blacklist, "initcall_blacklist")
    assert not kernel_knows(blacklist + b"initcall_blacklist requires CONFIG_KALLSYMS\n\0",
                            "initcall_blacklist")


def test_load_linux_leaves_out_droppable_arguments_the_image_lacks():
    elf = make_elf([(0x1000000, b"\xf4" * 64 + NAMES, 0x1000)], 0x1000000,
                   banner=b"Linux version 6.6.6-params-test (me@here) #1 SMP")
    mem = GuestMemory.for_test(64 * layout.MiB)
    try:
        plan = load_linux(mem, elf, "console=ttyS0 audit=0 psi=0 noxsave percpu_alloc=page",
                          droppable=["audit", "psi", "percpu_alloc"])
        line = mem.read(layout.CMDLINE, 256).split(b"\0")[0].decode()
    finally:
        mem.close()
    assert plan.dropped == ("psi",)
    # noxsave is unknown too, but not droppable: only what the VMM added on its own may go.
    assert line == "console=ttyS0 audit=0 noxsave percpu_alloc=page"
    assert plan.description["cmdline"] == line


@pytest.mark.kvm
def test_test_kernel_gets_only_the_kvm_pvm_arguments_it_knows(kvm, kernel):
    """Linux 6.1 has no `noxsave` or `nosmap` (clearcpuid= hides XSAVE and SMAP for pykvm) and the
    test kernel no audit or psi; a user's own `noxsave` stays. Nothing boots."""
    from pykvm import LinuxVM
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True, append="noxsave") as vm:
        line = str(vm.cmdline).split()
        assert vm.plan.description["cmdline"] == str(vm.cmdline)
    assert line.count("noxsave") == 1               # the user's
    assert "nosmap" not in line and "audit=0" not in line and "psi=0" not in line
    assert not any(a.startswith("initcall_blacklist=") for a in line)     # no KALLSYMS
    assert "percpu_alloc=page" in line and "noreplace-smp" in line
    assert any(a.startswith("clearcpuid=") for a in line)
    assert "nosmap" not in vm.added_pvm_args and "audit=0" not in vm.skipped_busywork
