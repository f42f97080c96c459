"""`python -m pykvm.demo` (what `./run boot` runs): boot a real kernel with the default assets.

The assets are built or fetched on first use and cached (pykvm.assets): the small test kernel built
from Debian's linux-source-6.1 and a busybox initramfs. `--cloud` boots Debian's stock cloud kernel
instead. Other arguments go to `pykvm boot`.

On a VT-x/AMD-V host the guest reaches a busybox shell on the terminal (Ctrl-A x quits). On a KVM-PVM
host no guest userland can run (pykvm.pvm), so the boot stops, successfully, when the kernel starts
/init.
"""

from __future__ import annotations

import sys

from . import cli, pvm
from .assets import AssetError, cloud_kernel, initramfs, test_kernel

RUN_INIT = r"Run /init as init process"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cloud = "--cloud" in argv
    if cloud:
        argv.remove("--cloud")
    try:
        kernel = cloud_kernel() if cloud else test_kernel().bzimage
        initrd = initramfs()
    except AssetError as e:
        print(f"pykvm: error: {e}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    args = ["boot", str(kernel), "--initrd", str(initrd)]
    if pvm.host_kind() == "KVM-PVM" and "--until" not in argv:
        print(f"pykvm: this host's /dev/kvm is KVM-PVM: guest userland cannot run here, so the demo "
              f"stops when the kernel prints {RUN_INIT!r}", file=sys.stderr)
        args += ["--until", RUN_INIT]
    return cli.main(args + argv)


if __name__ == "__main__":
    sys.exit(main())
