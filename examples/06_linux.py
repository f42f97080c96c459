"""06: boot Linux - the same machinery, a bigger guest.

    python examples/06_linux.py [bzImage [initramfs]]

Without arguments it uses pykvm's default test kernel and busybox initramfs (built or fetched and
cached on first use: this can take several minutes the first time). LinuxVM puts together what the
earlier examples did by hand: RAM, the in-kernel interrupt controller, a 16550A UART on COM1, the
Linux boot protocol (zero page, command line, initrd), page tables and long mode, and the run loop.
"""

import sys

from pykvm.linux import LinuxVM

if len(sys.argv) > 1:
    kernel, initrd = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
else:
    from pykvm.assets import initramfs, test_kernel
    kernel, initrd = test_kernel().bzimage, initramfs()

with LinuxVM(kernel, initrd=initrd, memory="256M") as vm:
    vm.console.tee(lambda data: sys.stdout.write(data.decode(errors="replace")))
    vm.start(timeout=600)
    vm.console.expect(r"Run /init as init process", timeout=600)
    vm.stop()
    print("\n--- the kernel started /init; exits seen by the VMM:", vm.stats["exits"])
