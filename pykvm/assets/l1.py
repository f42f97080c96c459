"""The AMD-V lane's L1 machine: Debian's standard kernel, a few of its modules, and our /init.

The lane (:mod:`pykvm.lane`) runs QEMU's software emulator with an AMD CPU that has SVM, boots
this kernel in it, and so gets a real AMD-V ``/dev/kvm`` on hosts that have none. Two assets:

* :func:`l1_kernel`: ``linux-image-amd64`` (a metapackage) resolved to the real image package
  (``linux-image-6.1.0-NN-amd64``), downloaded and unpacked; the cache keeps its vmlinuz and
  only the modules the lane loads (a few MB of the package's ~400 MB), in load order. Debian's
  package has no ``modules.dep`` (depmod runs at install), so the order comes from each module's
  own ``depends=`` (:mod:`.kmod`).
* :func:`l1_initramfs`: busybox-static, those modules under ``/lib/modules/NAME.ko``, their
  order in ``/etc/pykvm-modules``, and ``l1-init.sh`` (next to this file: read it) as /init.

Nothing in either depends on the command the lane will run: that goes in a job script on the
run's writable share, so both assets are built once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import debian
from .cache import cached
from .cpio import CpioEntry, write_cpio
from .errors import AssetError
from .kmod import index, load_order, read_module
from .progress import Progress
from .userland import applets, busybox, busybox_version

METAPACKAGE = "linux-image-amd64"
RECIPE_VERSION = "1"  # bump when what is built changes in a way the inputs miss
# What /init loads (dependencies are added and ordered by kmod.load_order):
#   kvm, kvm_amd       KVM itself and its AMD-V (SVM) backend; kvm_amd needs ccp (the AMD Secure
#                      Processor driver, for SEV) and kvm needs irqbypass
#   virtio_pci, 9pnet_virtio, 9p    the host's file trees over QEMU's virtio-9p-pci (-virtfs);
#                      9p needs netfs and fscache in 6.1
#   tun                /dev/net/tun, for tests that give an L2 guest a tap device
L1_MODULES = ["irqbypass", "ccp", "kvm", "kvm_amd", "netfs", "fscache", "9pnet", "virtio_ring",
              "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
              "9pnet_virtio", "9p", "tun"]
MODULES_LIST = "etc/pykvm-modules"


@dataclass(frozen=True)
class L1Kernel:
    vmlinuz: Path
    release: str  # "6.1.0-NN-amd64"
    modules: list[Path]  # plain .ko files, in load order
    package: str  # "linux-image-6.1.0-NN-amd64 6.1.xxx-y"


def init_script() -> str:
    """The text of /init (``pykvm/assets/l1-init.sh``)."""
    return resources.files(__package__).joinpath("l1-init.sh").read_text()


def l1_kernel(*, progress: Progress | None = None) -> L1Kernel:
    """Debian's standard kernel and the lane's modules, fetched once into the cache."""
    progress = progress or Progress("l1-kernel")
    package, version = debian.resolve_metapackage(METAPACKAGE, progress)

    def build(tmp: Path) -> None:
        unpacked = debian.fetch(package, version, tmp / "deb", progress)
        vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
        releases = sorted((unpacked / "lib" / "modules").glob("*/modules.order"))
        if not vmlinuz or not releases:
            raise AssetError(f"{package} {version} lacks /boot/vmlinuz-* or modules.order; "
                             "pykvm expects Debian's layout")
        release_dir = releases[0].parent
        builtin = release_dir / "modules.builtin"
        paths = index(releases[0].read_text())
        order = load_order(L1_MODULES, paths,
                           lambda rel: read_module(release_dir, rel),
                           builtin.read_text().split() if builtin.is_file() else ())
        progress.say(f"kept {len(order)} modules: {' '.join(order)}")
        modules = tmp / "modules"
        modules.mkdir()
        for name in order:
            (modules / f"{name}.ko").write_bytes(read_module(release_dir, paths[name]))
        (tmp / "modules.load").write_text("".join(f"{name}\n" for name in order))
        (tmp / "release").write_text(release_dir.name + "\n")
        vmlinuz[0].rename(tmp / vmlinuz[0].name)
        shutil.rmtree(tmp / "deb")

    entry = cached("l1-kernel", {"package": package, "version": version, "recipe": RECIPE_VERSION,
                                 "modules": " ".join(L1_MODULES)}, build)
    try:
        names = (entry / "modules.load").read_text().split()
        release = (entry / "release").read_text().strip()
        vmlinuz = sorted(entry.glob("vmlinuz-*"))[0]
    except (OSError, IndexError):
        raise AssetError(f"cache entry {entry} is incomplete; remove it and retry") from None
    return L1Kernel(vmlinuz, release, [entry / "modules" / f"{n}.ko" for n in names],
                    f"{package} {version}")


def initramfs_tree(busybox_bytes: bytes, applet_paths: list[str], modules: list[tuple[str, bytes]],
                   init: str) -> list[CpioEntry]:
    """The L1 initramfs as archive entries: ``modules`` is ``[(name, plain .ko bytes)]`` in load order."""
    entries = [CpioEntry.directory(d) for d in
               ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "lib",
                "lib/modules", "host", "share", "tmp")]
    have = {e.name for e in entries}
    entries.append(CpioEntry.file("init", init.encode(), 0o755))
    entries.append(CpioEntry.file("bin/busybox", busybox_bytes, 0o755))
    for path in applet_paths:
        parent = path.rpartition("/")[0]
        if path in have or path == "init":
            continue
        if parent and parent not in have:
            entries.append(CpioEntry.directory(parent))
            have.add(parent)
        entries.append(CpioEntry.symlink(path, "/bin/busybox"))
        have.add(path)
    for name, data in modules:
        entries.append(CpioEntry.file(f"lib/modules/{name}.ko", data))
    entries.append(CpioEntry.file(MODULES_LIST, "".join(f"{n}\n" for n, _ in modules).encode()))
    entries.append(CpioEntry.char_device("dev/console", 5, 1, 0o600))
    return entries


def l1_initramfs(kernel: L1Kernel | None = None, *, progress: Progress | None = None) -> Path:
    """``l1.cpio``: busybox, the lane's modules and /init (uncompressed: QEMU loads it as is)."""
    progress = progress or Progress("l1-initramfs")
    kernel = kernel or l1_kernel(progress=progress)
    bb = busybox(progress)
    init = init_script()

    def build(tmp: Path) -> None:
        progress.say("writing cpio archive")
        modules = [(p.stem, p.read_bytes()) for p in kernel.modules]
        (tmp / "l1.cpio").write_bytes(write_cpio(initramfs_tree(bb.read_bytes(), applets(bb), modules, init)))

    inputs = {"kernel": kernel.package, "modules": " ".join(p.stem for p in kernel.modules),
              "busybox": busybox_version(), "init": init, "recipe": RECIPE_VERSION}
    return cached("l1-initramfs", inputs, build) / "l1.cpio"
