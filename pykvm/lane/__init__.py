"""The AMD-V lane: run a command, or pytest tests, on a real AMD-V /dev/kvm on any Linux host.

pykvm's users run it on VT-x/AMD-V hosts; many cloud machines (ours among them) only offer
KVM-PVM, where no guest userland can run. QEMU's software emulator (TCG) implements AMD's SVM
well enough for Linux's kvm_amd, so a small QEMU machine ("L1") is such a host. How a run goes:

1. Assets, on this host (:mod:`pykvm.assets.l1`): Debian's standard kernel and the modules the
   lane loads, and an initramfs of busybox, those modules and ``pykvm/assets/l1-init.sh``.
2. A run directory is made (:mod:`.runner`): it is the writable share, and holds ``job.sh``,
   which runs the command in its directory with its environment.
3. QEMU boots L1 (:mod:`.qemu`): TCG, ``-cpu EPYC,+svm,+npt``, this host's ``/`` read-only over
   virtio-9p and the run directory writable. One lane at a time (a lock in the asset cache).
4. L1's /init loads kvm and kvm-amd and the 9p modules, mounts ``/`` and the share, and runs
   ``job.sh`` in a chroot of the host's tree with proc, sys, dev and fresh tmpfs mounts, so the
   checkout, its venv and the asset cache are at the same paths as here, read-only.
5. The job's output streams back on the second serial port; its exit status is written to the
   share; /init powers L1 off, which ends QEMU. L1's console is kept for failure reports.

Users: ``pykvm selftest [-- COMMAND]`` (:mod:`.selftest`), and the ``amdv`` pytest marker
(:mod:`.pytest_plugin`), whose tests all run in one lane boot. Under TCG, times mean nothing:
the lane is for behaviour, never for performance figures. Where TCG's SVM is not AMD's, and the one
guest-kernel warning that costs (a guest's XSETBV never reaches L1's KVM): :mod:`.tcg`.
"""

from .qemu import LaneError, LaneUnavailable
from .runner import LANE_FAILED, LANE_TIMEOUT, LaneResult, cleanup, run

__all__ = ["LANE_FAILED", "LANE_TIMEOUT", "LaneError", "LaneResult", "LaneUnavailable", "cleanup", "run"]
