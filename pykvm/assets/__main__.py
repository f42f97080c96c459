"""``python -m pykvm.assets [test-kernel|cloud-kernel|initramfs|tiny-initramfs|disk|lane|all] [--print-path]``.

Builds or fetches the named default assets (all of them by default) and
prints where they are in the cache. Progress goes to stderr; with
``--print-path`` stdout carries only the paths, one per line. Failures print
``pykvm: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from . import debian
from .cache import cache_root
from .errors import AssetError

ASSETS = ["test-kernel", "cloud-kernel", "initramfs", "tiny-initramfs", "disk", "lane"]
ALIASES = {"kernel": "test-kernel"}


def _paths(name: str) -> list[tuple[str, str]]:
    from . import cloud_kernel, disk_image, initramfs, test_kernel

    if name == "test-kernel":
        k = test_kernel()
        return [("test-kernel bzImage", str(k.bzimage)), ("test-kernel vmlinux", str(k.vmlinux))]
    if name == "cloud-kernel":
        return [("cloud-kernel", str(cloud_kernel()))]
    if name == "initramfs":
        return [("initramfs", str(initramfs()))]
    if name == "tiny-initramfs":
        return [("tiny-initramfs", str(initramfs(tiny=True)))]
    if name == "disk":
        return [("disk", str(disk_image()))]
    if name == "lane":  # the AMD-V lane's L1 machine (pykvm/lane)
        from .l1 import l1_initramfs, l1_kernel
        k = l1_kernel()
        return [("lane L1 kernel", str(k.vmlinuz)), ("lane L1 initramfs", str(l1_initramfs(k)))]
    raise AssertionError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykvm.assets", description=__doc__.split("\n\n")[1])
    # (no `choices=`: argparse would check the list default against them and refuse it)
    parser.add_argument("asset", nargs="*", metavar="ASSET",
                        help=f"one or more of {', '.join(ASSETS)}, all (default: all)")
    parser.add_argument("--print-path", action="store_true", help="print only the paths on stdout")
    parser.add_argument("--refresh", action="store_true",
                        help="ask apt again for the newest package versions")
    args = parser.parse_args(argv)
    for a in args.asset:
        if a not in (*ASSETS, *ALIASES, "all"):
            parser.error(f"unknown asset {a!r}: choose from {', '.join(ASSETS)}, all")
    wanted: list[str] = []
    for a in args.asset or ["all"]:
        for name in ASSETS if a == "all" else [ALIASES.get(a, a)]:
            if name not in wanted:
                wanted.append(name)
    if args.refresh:
        debian.forget_resolutions()
    try:
        for name in wanted:
            for label, path in _paths(name):
                print(path if args.print_path else f"{label}: {path}", flush=True)
    except AssetError as e:
        print(f"pykvm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `... --print-path | head -1`
        sys.stdout = None  # type: ignore[assignment]  # nothing more can be written
        return 0
    if not args.print_path:
        print(f"(cache: {cache_root()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
