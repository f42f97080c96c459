"""pykvm leaves out the KVM-PVM arguments it would add that the kernel does not know (boot/params.py)."""

import pytest

from pykvm.boot import load_linux, stage_kernel
from pykvm.boot.params import kernel_knows, unknown_keys
from pykvm.memory import GuestMemory
from pykvm.testing.synthetic import compress, make_bzimage, make_elf
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
    # Every place the name appears counts, not only the first.
    assert kernel_knows(NAMES + b"psi=\0", "psi") and kernel_knows(NAMES + b"psi\0", "psi")
    assert not kernel_knows(b"psi", "psi") and not kernel_knows(b"psi=", "psi")    # at the end


def test_a_name_the_kernel_says_it_ignores_counts_as_unknown():
    blacklist = b"\0initcall_blacklist=\0"
    assert kernel_knows(blacklist, "initcall_blacklist")
    assert not kernel_knows(blacklist + b"initcall_blacklist requires CONFIG_KALLSYMS\n\0",
                            "initcall_blacklist")


def elf_with_names():
    return make_elf([(0x1000000, b"\xf4" * 64 + NAMES, 0x1000)], 0x1000000,
                    banner=b"Linux version 6.6.6-params-test (me@here) #1 SMP")


def test_a_staged_kernel_names_what_it_lacks_and_load_linux_writes_the_line_as_given():
    staged = stage_kernel(elf_with_names())
    assert staged.unknown_params(["audit", "psi", "percpu_alloc"]) == ["psi"]
    mem = GuestMemory.for_test(64 * layout.MiB)
    try:
        # The loader edits nothing: LinuxVM settles the line (pykvm/linux.py, _forget).
        plan = load_linux(mem, staged, "console=ttyS0 audit=0 psi=0 noxsave")
        line = mem.read(layout.CMDLINE, 256).split(b"\0")[0].decode()
    finally:
        mem.close()
    assert line == "console=ttyS0 audit=0 psi=0 noxsave" == plan.description["cmdline"]


def test_a_kernel_the_guest_decompresses_is_taken_to_know_everything():
    vmlinux = elf_with_names()
    bzimage = make_bzimage(compress(vmlinux, "gzip"))
    assert stage_kernel(bzimage).unknown_params(["psi", "audit"]) == ["psi"]
    assert stage_kernel(bzimage, decompress=False).unknown_params(["psi", "audit"]) == []


def test_one_staged_kernel_loaded_twice_keeps_each_plans_description():
    staged = stage_kernel(elf_with_names())
    plans = []
    for text in ("first", "second"):
        mem = GuestMemory.for_test(64 * layout.MiB)
        try:
            plans.append(load_linux(mem, staged, text))
        finally:
            mem.close()
    assert [p.description["cmdline"] for p in plans] == ["first", "second"]


def written_line(vm) -> str:
    """The command line as the guest will read it (pykvm.x86.layout.CMDLINE)."""
    return vm.machine.mem.read(layout.CMDLINE, layout.CMDLINE_MAX).split(b"\0")[0].decode()


@pytest.mark.kvm
def test_test_kernel_gets_only_the_kvm_pvm_arguments_it_knows(kvm, kernel):
    """Linux 6.1 has no `nosmap` (clearcpuid= hides SMAP for pykvm) and the test kernel no audit,
    psi or nokaslr; it does know `noxsave`. A user's own argument stays, known or not: here
    `nosmap`, which pykvm adds too. Nothing boots."""
    from pykvm import LinuxVM
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True, append="nosmap") as vm:
        line = str(vm.cmdline).split()
        assert written_line(vm) == str(vm.cmdline) == vm.plan.description["cmdline"]
    assert line.count("nosmap") == 1                # the user's
    assert "noxsave" in line and "noxsave" in vm.added_pvm_args
    assert "nokaslr" not in line and "audit=0" not in line and "psi=0" not in line
    assert not any(a.startswith("initcall_blacklist=") for a in line)     # no KALLSYMS
    assert "percpu_alloc=page" in line and "noreplace-smp" in line
    assert any(a.startswith("clearcpuid=") for a in line)
    assert "nokaslr" not in vm.added_pvm_args and "audit=0" not in vm.skipped_busywork


@pytest.mark.kvm
def test_a_test_kernel_left_compressed_keeps_every_kvm_pvm_argument(kvm, kernel):
    """decompress=False: the guest unpacks its kernel, the host cannot read it, so pykvm's own
    arguments all stay, and what is written to the guest is still `vm.cmdline`. Nothing boots."""
    from pykvm import LinuxVM
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True, decompress=False) as vm:
        line = str(vm.cmdline).split()
        assert written_line(vm) == str(vm.cmdline) == vm.plan.description["cmdline"]
    assert "nosmap" in line and "nosmap" in vm.added_pvm_args
    assert "audit=0" in line and "audit=0" in vm.skipped_busywork


@pytest.mark.kvm
def test_one_vcpu_unpacks_the_initramfs_in_its_initcall(kvm, kernel):
    """KVM-PVM, one vCPU: `initramfs_async=0` (nothing can run beside the unpacking); with two
    vCPUs the kernel keeps its asynchronous unpacking. A user's own value stays. Nothing boots."""
    from pykvm import LinuxVM
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True) as vm:
        assert "initramfs_async=0" in str(vm.cmdline).split()
        assert "initramfs_async=0" in vm.added_pvm_args
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True, cpus=2) as vm:
        assert not vm.cmdline.has("initramfs_async")
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True,
                 append="initramfs_async=1") as vm:
        assert vm.cmdline.get("initramfs_async") == "1"


@pytest.mark.kvm
def test_a_restored_vm_reports_the_command_line_its_guest_booted_with(kvm, kernel, tmp_path):
    """A restore reads no kernel, so the LinuxVM it builds cannot know which of pykvm's arguments
    were left off: the snapshot carries the line. Saved before the first instruction; nothing
    boots."""
    from pykvm import LinuxVM
    path = tmp_path / "vm.snap"
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=True) as vm:
        vm.save(path)
        line, added, skipped = str(vm.cmdline), vm.added_pvm_args, vm.skipped_busywork
    assert "nosmap" not in line.split()             # one the test kernel does not know
    with LinuxVM.restore(path) as restored:
        assert written_line(restored) == line == str(restored.cmdline)
        assert (restored.added_pvm_args, restored.skipped_busywork) == (added, skipped)
    # A file whose recorded line cannot be parsed is refused like any unusable snapshot.
    from pykvm.snapshot import SnapshotError
    from test_snapshot import _rewrite

    def unbalanced(sections):
        sections["META"]["config"]["cmdline"] = 'console=ttyS0 "'
    _rewrite(path, tmp_path / "bad.snap", unbalanced)
    with pytest.raises(SnapshotError, match="its command line is unusable"):
        LinuxVM.restore(tmp_path / "bad.snap")


@pytest.mark.kvm
def test_a_line_too_long_for_the_kernel_says_how_much_append_may_have(kvm, tmp_path):
    """The kernel takes setup_header.cmdline_size bytes of command line, pykvm's own arguments
    included: the error says how long --append may be beside them. Nothing boots."""
    from pykvm import LinuxVM
    from pykvm.boot import BootError
    from pykvm.testing.synthetic import compress, make_bzimage, make_elf
    vmlinux = make_elf([(0x1000000, bytes(4096), 0x1000)], 0x1000000,
                       banner=b"Linux version 6.1.0-fake (t@t) #1")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(compress(vmlinux, "gzip"), cmdline_size=2047))
    with LinuxVM(kernel, memory="64M") as vm:
        own = len(str(vm.cmdline)) + 1              # pykvm's arguments and the space before them
    with LinuxVM(kernel, memory="64M", append="a" * (2047 - own)) as vm:
        assert len(str(vm.cmdline)) == 2047
    with pytest.raises(BootError) as e:
        LinuxVM(kernel, memory="64M", append="a" * (2048 - own))
    assert str(e.value) == (f"command line is 2048 bytes but this kernel accepts at most 2047 "
                            f"(setup_header.cmdline_size): --append is {2048 - own} bytes; beside "
                            f"pykvm's own {own} it can have at most {2047 - own}")
