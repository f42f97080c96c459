"""The QEMU command line of the lane's L1 machine.

QEMU's TCG (its software emulator: no /dev/kvm needed) implements AMD's SVM, the instructions
and VMCB of AMD-V (AMD64 Architecture Programmer's Manual vol. 2, chapter 15), including nested
paging (NPT). Linux's kvm_amd accepts it, so L1 gets a real AMD-V /dev/kvm. Measured choices:

* ``-cpu EPYC,+svm,+npt``: an AMD model (kvm_amd checks the vendor) with SVM and NPT switched on.
  ``qemu64,+svm`` works as well, without NPT (then L1's KVM shadows L2's page tables). TCG says
  "TCG doesn't support requested feature" for bits it lacks (nrip-save...): harmless.
* ``-m 2G -smp 1``: room for L2 guests and tmpfs; one vCPU, since TCG's single-threaded
  emulation on a shared 2-core host gains nothing from more.
* ``-virtfs``: virtio-9p-pci devices serving host directories. The host's / read-only (the
  checkout, its venv, the asset cache and the host's tools at their own paths), and the run
  directory writable, and read-only shares of their own for the checkout or asset cache when they
  lie under /tmp or /run, which L1 mounts fresh (pykvm.lane.runner.exported_paths). ``multidevs=remap`` keeps inode numbers unique across the host's mounts.
  ``security_model=none``: files are read and created as the QEMU process's user.
* ``-serial``: COM1 (ttyS0) is L1's console, kept in a file for failure reports; COM2 (ttyS1)
  carries the job's output on QEMU's stdout.
* ``-no-reboot`` with ``panic=-1``: an L1 panic ends QEMU instead of rebooting forever.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

QEMU = "qemu-system-x86_64"
DEBIAN_PACKAGE = "qemu-system-x86"
CPU = "EPYC,+svm,+npt"
MEMORY = "2G"
ROOT_TAG = "pykvm-root"
SHARE_TAG = "pykvm-share"
SHARE_ARG = "pykvm.share"
EXPORT_TAG = "pykvm-ro{}"   # the read-only shares of exported paths, numbered
EXPORT_ARG = "pykvm.ro{}"


class LaneError(Exception):
    """The lane cannot do what was asked; the message is one line saying why."""


class LaneUnavailable(LaneError):
    """The lane cannot run on this host (the message says why and what to install)."""


def qemu_binary() -> str:
    """The path of qemu-system-x86_64, or :class:`LaneUnavailable` naming the package to install."""
    path = shutil.which(QEMU)
    if path is None:
        raise LaneUnavailable(f"{QEMU} not found: the AMD-V lane needs QEMU "
                              f"(Debian: apt-get install {DEBIAN_PACKAGE})")
    return path


def kernel_cmdline(share: Path, exports: Sequence[Path] = ()) -> str:
    """L1's command line. The share's path and the exported paths go to /init (which mounts them
    at those paths in the chroot)."""
    for path, what in [(share, "the lane's run directory"), *((p, "the exported directory") for p in exports)]:
        if any(c.isspace() for c in str(path)):
            raise LaneError(f"{what} {path} contains white space (set TMPDIR elsewhere or move it)")
    args = [f"{EXPORT_ARG.format(i)}={path}" for i, path in enumerate(exports)]
    return " ".join(["console=ttyS0", "panic=-1", f"{SHARE_ARG}={share}", *args])


def command_line(qemu: str, kernel: Path, initrd: Path, share: Path, console_log: Path, *,
                 exports: Sequence[Path] = (), cpu: str = CPU, memory: str = MEMORY) -> list[str]:
    """The argv that boots L1 with ``share`` writable, ``/`` and ``exports`` read-only."""
    virtfs = []
    for i, path in enumerate(exports):
        virtfs += ["-virtfs", f"local,path={path},mount_tag={EXPORT_TAG.format(i)},security_model=none,"
                              "readonly=on,multidevs=remap"]
    return [
        qemu, "-accel", "tcg", "-cpu", cpu, "-m", memory, "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", kernel_cmdline(share, exports),
        "-serial", f"file:{console_log}",  # COM1: ttyS0, L1's console
        "-serial", "stdio",  # COM2: ttyS1, the job's output
        "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,multidevs=remap",
        *virtfs,
    ]
