"""The kernel's reports of trouble in a console log (pykvm/testing/kernellog.py), and the one the
AMD-V lane tolerates when it is measured there (pykvm/lane/tcg.py). No KVM: the console below is
recorded from the lane (the test kernel as L2, 2026-12-03), its lines as the UART delivered them."""

import pytest

from pykvm.lane.tcg import XSAVE_SPLAT, unexpected_splats
from pykvm.testing.kernellog import kernel_splats

from conftest import needs_kvm

LANE_L2_BOOT = """\
[    0.944874] Last level dTLB entries: 4KB 512, 2MB 0, 4MB 0, 1GB 0\r
[    0.955147] Speculative Store Bypass: Vulnerable\r
[    0.976035] ------------[ cut here ]------------\r
[    1.004989] XSAVE consistency problem: size 832 != kernel_size 576\r
[    1.029427] WARNING: CPU: 0 PID: 0 at 0xffffffff81a92cca\r
[    1.044895] CPU: 0 PID: 0 Comm: swapper/0 Not tainted 6.1.192-pykvm #1 \r
[    1.064919] RIP: 0010:0xffffffff81a92cca\r
[    1.114819] RSP: 0000:ffffffff81a03eb0 EFLAGS: 00010286\r
[    1.194974] Call Trace:\r
[    1.207864]  <TASK>\r
[    1.214856]  ? 0xffffffff81a9241e\r
[    1.254822]  </TASK>\r
[    1.264886] ---[ end trace 0000000000000000 ]---\r
[    1.284986] CPUID[0d, 00]: eax=00000007 ebx=00000240 ecx=00000340 edx=00000000\r
[    1.294891] CPUID[0d, 01]: eax=00000005 ebx=00000000 ecx=00000000 edx=00000000\r
[    1.847232] Freeing SMP alternatives memory: 20K\r
"""

# Another WARN, in the same format (kernel/panic.c __warn), as any kernel bug would print it.
OTHER_WARN = """\
[    2.100000] ------------[ cut here ]------------\r
[    2.100001] WARNING: CPU: 0 PID: 1 at drivers/base/core.c:123 device_add+0x1/0x2\r
[    2.100002] Call Trace:\r
[    2.100003]  <TASK>\r
[    2.100004]  </TASK>\r
[    2.100005] ---[ end trace 0000000000000001 ]---\r
"""


def test_the_lanes_xsave_warn_is_one_splat_named_by_its_message():
    splats = kernel_splats(LANE_L2_BOOT)
    assert [s.message for s in splats] == [XSAVE_SPLAT]
    assert splats[0].lines[0] == "------------[ cut here ]------------"
    assert splats[0].lines[-1] == "---[ end trace 0000000000000000 ]---"


def test_a_quiet_boot_and_mere_mentions_of_warning_are_no_splats():
    quiet = LANE_L2_BOOT.split("[    0.976035]")[0]
    srso = "[    0.258471] Speculative Return Stack Overflow: WARNING: See https://kernel.org/\n"
    assert kernel_splats(quiet + srso) == []


@pytest.mark.parametrize("line", [
    "[    3.0] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "[   22.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:1]",
    "[    3.0] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
    "[    3.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009",
    "[  245.0] INFO: task kworker/0:1:12 blocked for more than 122 seconds.",
    "[   30.0] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:",
])
def test_bugs_oopses_panics_and_stalls_are_splats(line):
    assert [s.message for s in kernel_splats(line + "\n[    3.1] Call Trace:\n")] == \
        [line.split("] ", 1)[1]]


def test_the_lane_tolerates_the_xsave_warn_only_where_xsetbv_was_measured_not_to_reach_kvm():
    assert unexpected_splats(LANE_L2_BOOT, xsetbv_reaches_kvm=False) == []
    for elsewhere in (True, None):     # real hardware, KVM-PVM, a QEMU with the intercept; unknown
        assert [s.message for s in unexpected_splats(LANE_L2_BOOT, xsetbv_reaches_kvm=elsewhere)] \
            == [XSAVE_SPLAT]


def test_the_lane_hides_no_other_warning():
    found = unexpected_splats(LANE_L2_BOOT + OTHER_WARN, xsetbv_reaches_kvm=False)
    assert [s.message for s in found] == \
        ["WARNING: CPU: 0 PID: 1 at drivers/base/core.c:123 device_add+0x1/0x2"]
    # Only that exact message: the WARN with other sizes (another CPU model) is not the known one.
    other_sizes = LANE_L2_BOOT.replace("size 832 !=", "size 2696 !=")
    assert len(unexpected_splats(other_sizes, xsetbv_reaches_kvm=False)) == 1


@needs_kvm
def test_xsetbv_reaches_kvm_on_this_host():
    """The probe itself, directly on this host (KVM-PVM here; VT-x/AMD-V elsewhere): a guest's
    XSETBV is seen by KVM. In the lane the same probe says False (test_lane_amdv.py)."""
    from pykvm.lane.tcg import xsetbv_reaches_kvm
    assert xsetbv_reaches_kvm() is True


def test_a_tolerated_warn_cut_short_does_not_hide_the_next_report():
    """A "cut here" block whose "end trace" line never came (the log cut off, or another CPU's
    report printed in between) ends at the next "cut here": the next WARN is a splat of its own,
    not lines of the tolerated one."""
    cut_short = LANE_L2_BOOT.split("[    1.264886]")[0]
    found = unexpected_splats(cut_short + OTHER_WARN, xsetbv_reaches_kvm=False)
    assert [s.message for s in found] == \
        ["WARNING: CPU: 0 PID: 1 at drivers/base/core.c:123 device_add+0x1/0x2"]
    assert [s.message for s in kernel_splats(cut_short + OTHER_WARN)][0] == XSAVE_SPLAT
