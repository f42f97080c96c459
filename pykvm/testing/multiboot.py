"""Build pykvm's multiboot test kernels (firmware/multiboot/) in the three forms a multiboot
loader accepts (pykvm/boot/multiboot.py):

    build("mbcheck", "elf32")   the spec's own format: a 32-bit ELF executable linked at 1 MiB
    build("mbcheck", "elf64")   the same image in a 64-bit ELF container (objcopy), as QEMU accepts
    build("mbcheck", "aout")    a flat binary (objcopy -O binary) whose header carries the address
                                fields (flag 16, the "a.out kludge")

Compiled with the machine's gcc (-m32) and ld into `$PYKVM_CACHE/firmware/<hash>/`, like the
firmware in pykvm/testing/firmware.py, and cached by a hash of the sources, flags and tools.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .firmware import FIRMWARE_DIR, FirmwareError, _run_tool, _tool_version, cache_root

MULTIBOOT_DIR = FIRMWARE_DIR / "multiboot"
FORMATS = ("elf32", "elf64", "aout")
CFLAGS = [
    "-m32", "-std=gnu11", "-Os", "-g", "-Wall", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
    # Everything runs at CPL0, in KVM-PVM's instruction emulator there: no SSE/x87 code.
    "-mno-sse", "-mno-mmx", "-mno-80387", "-mgeneral-regs-only",
]
_VERSION = "1"


def build(name: str = "mbcheck", fmt: str = "elf32", *, cache: Path | None = None) -> Path:
    """Compile firmware/multiboot/<name>.c with entry.S into `fmt`; return the file's path."""
    if fmt not in FORMATS:
        raise FirmwareError(f"multiboot format {fmt!r}: one of {', '.join(FORMATS)}")
    source = MULTIBOOT_DIR / f"{name}.c"
    if not source.is_file():
        raise FirmwareError(f"no multiboot program {name!r} (firmware/multiboot/{name}.c)")
    inputs = [source, MULTIBOOT_DIR / "entry.S", MULTIBOOT_DIR / "link.ld"]
    h = hashlib.sha256(f"pykvm-multiboot {_VERSION} {name} {fmt}\n".encode())
    h.update("\0".join(CFLAGS).encode())
    for tool in ("gcc", "ld", "objcopy"):
        h.update(_tool_version(tool).encode())
    for p in inputs:
        h.update(p.read_bytes())
    out_dir = (cache or cache_root()) / "firmware" / h.hexdigest()[:20]
    out = out_dir / f"{name}.{fmt}"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        t = Path(tmp)
        defines = ["-DAOUT_KLUDGE"] if fmt == "aout" else []
        _run_tool(["gcc", *CFLAGS, *defines, "-c", str(MULTIBOOT_DIR / "entry.S"),
                   "-o", str(t / "entry.o")], f"{name} (entry.S)")
        _run_tool(["gcc", *CFLAGS, "-c", str(source), "-o", str(t / "main.o")], f"{name} ({name}.c)")
        elf = t / "kernel.elf32"
        _run_tool(["ld", "-m", "elf_i386", "-nostdlib", "-static", "--no-warn-rwx-segments",
                   "-T", str(MULTIBOOT_DIR / "link.ld"), "-o", str(elf),
                   str(t / "entry.o"), str(t / "main.o")], f"{name} (link)")
        if fmt == "elf64":
            _run_tool(["objcopy", "-O", "elf64-x86-64", str(elf), str(t / "out")], f"{name} (objcopy)")
        elif fmt == "aout":
            _run_tool(["objcopy", "-O", "binary", str(elf), str(t / "out")], f"{name} (objcopy)")
        else:
            os.replace(elf, t / "out")
        os.replace(t / "out", out)
    return out
