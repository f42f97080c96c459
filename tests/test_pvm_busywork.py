"""The boot work pykvm skips on KVM-PVM hosts because only guest userland would notice it
(pykvm/pvm/busywork.py): which arguments, how they meet the user's own, and the switch that keeps it."""

import pytest

from pykvm import pvm
from pykvm.boot.cmdline import Cmdline
from pykvm.config import MachineConfig


def test_every_argument_is_one_word_with_a_reason():
    args = pvm.busywork_args()
    assert all(a and " " not in a for a in args)
    assert all(why for _, why in pvm.skipped_description())
    blacklists = [a for a in args if a.startswith("initcall_blacklist=")]
    assert len(blacklists) == 1                          # one comma list
    names = blacklists[0].split("=", 1)[1].split(",")
    assert len(names) == len(set(names)) and all(names)
    # The two that made Debian's kernels' boots take minutes longer than they need here:
    assert "cryptomgr.notests" in args and "load_system_certificate_list" in names


def test_nothing_that_changes_kernel_timekeeping():
    """Clock and interrupt choices stay the user's: kernel code can see them."""
    keys = {a.split("=", 1)[0] for a in pvm.busywork_args()}
    assert not keys & {"no-kvmclock", "highres", "tsc", "noirqdebug", "clocksource"}


def test_added_to_an_empty_line_in_order():
    line = Cmdline("")
    added = pvm.add_busywork_args(line)
    assert added == pvm.busywork_args()
    assert str(line) == " ".join(pvm.busywork_args())


def test_the_users_value_wins_and_blacklists_add_up():
    line = Cmdline("audit=1 initcall_blacklist=my_init cryptomgr.notests=0")
    added = pvm.add_busywork_args(line)
    assert line.get("audit") == "1" and "audit=0" not in added
    assert str(line).count("cryptomgr.notests") == 1
    # The kernel appends each initcall_blacklist= to one list: the user's stays, ours is added.
    assert "initcall_blacklist=my_init" in str(line)
    assert str(line).count("initcall_blacklist=") == 2
    assert [a for a in added if a.startswith("initcall_blacklist=")]


def test_machine_config_switch():
    assert MachineConfig().pvm_skip_busywork is True
    assert MachineConfig(pvm_skip_busywork=False).pvm_skip_busywork is False


@pytest.mark.kvm
@pytest.mark.parametrize("workarounds, skip, expected", [
    (True, True, True), (True, False, False), (False, True, False)])
def test_linux_vm_adds_them_only_with_the_workarounds(kvm, kernel, workarounds, skip, expected):
    """Forced on (as on a KVM-PVM host) or off; nothing boots, the command line is only built."""
    from pykvm import LinuxVM
    with LinuxVM(kernel.bzimage, memory="64M", pvm_workarounds=workarounds,
                 pvm_skip_busywork=skip) as vm:
        # (The test kernel keeps mitigations=off; it has no KALLSYMS, so initcall_blacklist= is
        # left off as one it would ignore: tests/test_kernel_params.py.)
        has = "mitigations=off" in str(vm.cmdline)
        assert has == expected and bool(vm.skipped_busywork) == expected
