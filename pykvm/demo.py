"""`python -m pykvm.demo` (what `./run boot` runs): boot a real kernel with the default assets.

The assets are fetched or built on first use and cached (pykvm.assets), with a busybox initramfs.
Which kernel depends on the host, so that nobody waits for what they do not need:

- on a VT-x/AMD-V host, Debian's stock cloud kernel (`linux-image-cloud-amd64`): fetched in seconds
  and quick to boot where kernel code runs in hardware;
- on a KVM-PVM host, where every guest kernel instruction is emulated, the small test kernel built
  from Debian's linux-source-6.1 (the first run builds it: 10-20 minutes on two cores, with
  progress); the stock kernel would take 6-8 minutes to reach /init there.

`--cloud` and `--test-kernel` choose explicitly. Other arguments go to `pykvm boot`.

On a VT-x/AMD-V host the guest reaches a busybox shell on the terminal (Ctrl-A x quits). On a KVM-PVM
host no guest userland can run (pykvm.pvm), so the boot stops, successfully, when the kernel starts
/init.
"""

from __future__ import annotations

import sys

from . import cli, pvm
from .assets import AssetError, cloud_kernel, initramfs, test_kernel

RUN_INIT = r"Run /init as init process"
USAGE = """usage: ./run boot [--cloud | --test-kernel] [pykvm boot options]

Boot the default kernel for this host (Debian's cloud kernel on VT-x/AMD-V, pykvm's test kernel on
KVM-PVM; --cloud / --test-kernel choose) with pykvm's busybox initramfs, both built or fetched
and cached on first use. The kernel and --initrd are given for you; pykvm boot's options follow.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:    # before any asset: a first build takes many minutes
        print(USAGE)
        return cli.main(["boot", "--help"])
    on_pvm = pvm.host_kind() == pvm.KVM_PVM
    cloud = not on_pvm
    for flag, choice in (("--cloud", True), ("--test-kernel", False)):
        while flag in argv:
            argv.remove(flag)
            cloud = choice
    try:
        kernel = cloud_kernel() if cloud else test_kernel().bzimage
        initrd = initramfs()
    except AssetError as e:
        print(f"pykvm: error: {e}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    args = ["boot", str(kernel), "--initrd", str(initrd)]
    if on_pvm and "--until" not in argv:
        print(f"pykvm: this host's /dev/kvm is KVM-PVM: guest userland cannot run here, so the demo "
              f"stops when the kernel prints {RUN_INIT!r}", file=sys.stderr)
        args += ["--until", RUN_INIT]
    return cli.main(args + argv)


if __name__ == "__main__":
    sys.exit(main())
