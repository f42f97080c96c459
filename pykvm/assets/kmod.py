"""Linux kernel modules as files: what a ``.ko`` depends on, and the order to load a set of them.

A distribution's kernel package ships ``/lib/modules/<release>/kernel/**.ko`` and
``modules.order`` (every module's path, in build order), but not ``modules.dep``: Debian's
postinst runs ``depmod`` at install time, and pykvm only unpacks the package. depmod itself gets
the dependencies from each module, so pykvm does the same.

A module is an ELF *relocatable* file (ET_REL). Its ``.modinfo`` section is a run of
NUL-terminated ``key=value`` strings written by ``MODULE_INFO()`` and ``modpost``::

    license=GPL\\0 ... depends=kvm,ccp\\0 retpoline=Y\\0 intree=Y\\0 name=kvm_amd\\0 vermagic=6.1.0-...

``depends=`` names the modules whose symbols this one uses (by module name, where ``-`` and
``_`` are the same: ``kvm-amd.ko`` is module ``kvm_amd``). Finding ``.modinfo`` takes the ELF
section headers (gABI chapter 4, "Sections"; ``Elf64_Shdr`` in <elf.h>), which pykvm's program
loader (:mod:`pykvm.elf`) never needs, so they are read here:

    Elf64_Ehdr  e_shoff   @0x28  file offset of the section header table
                e_shentsize @0x3a, e_shnum @0x3c, e_shstrndx @0x3e (the section of section names)
    Elf64_Shdr  sh_name @0x00 (offset into the names section), sh_type @0x04,
                sh_offset @0x18, sh_size @0x20                       (64 bytes each)

Modules may be compressed (``.ko.xz``, ``.ko.zst``, ``.ko.gz``: CONFIG_MODULE_COMPRESS_*).
Debian 12's are not (CONFIG_MODULE_COMPRESS_NONE=y), but a later package may be, so
:func:`read_module` decompresses whatever it finds and the initramfs always holds plain ``.ko``
files that busybox's ``insmod`` can load with no decompressor of its own.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import AssetError

_EHDR_TAIL = struct.Struct("<QIHHHHHH")  # e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, ...
SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str | Path) -> str:
    """``.../kvm-amd.ko.xz`` -> ``kvm_amd`` (the kernel's name for it)."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def decompress(name: str, data: bytes) -> bytes:
    """The plain ELF of a possibly compressed module file named ``name``."""
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` strings of a module, ``{"depends": ["kvm,ccp"], "alias": [...], ...}``."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian 64-bit ELF file")
    shoff, _, _, _, _, shentsize, shnum, shstrndx = _EHDR_TAIL.unpack_from(elf, 0x28)
    if shentsize != _SHDR.size or shstrndx >= shnum or shoff + shnum * shentsize > len(elf):
        raise ValueError("malformed section header table")
    sections = [_SHDR.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    names_off, names_size = sections[shstrndx][4], sections[shstrndx][5]
    names = elf[names_off:names_off + names_size]
    for sh_name, _, _, _, offset, size, *_ in sections:
        end = names.find(b"\0", sh_name)
        if names[sh_name:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[offset:offset + size].split(b"\0"):
                key, eq, value = item.decode(errors="replace").partition("=")
                if eq:
                    info.setdefault(key, []).append(value)
            return info
    raise ValueError("no .modinfo section: not a kernel module")


def depends(elf: bytes) -> list[str]:
    """Module names this module needs loaded first (``depends=kvm,ccp`` -> ``["kvm", "ccp"]``)."""
    return [d.replace("-", "_") for v in modinfo(elf).get("depends", []) for d in v.split(",") if d]


def index(modules_order: str) -> dict[str, str]:
    """Module name -> path relative to ``/lib/modules/<release>/``, from ``modules.order``.

    ``modules.order`` lists ``kernel/...ko`` even where the package holds ``.ko.xz``; the caller's
    reader resolves the suffix (:func:`read_module`)."""
    out: dict[str, str] = {}
    for line in modules_order.splitlines():
        line = line.strip()
        if line:
            out.setdefault(module_name(line), line)
    return out


def read_module(release_dir: Path, relpath: str) -> bytes:
    """The plain ELF of ``relpath`` under ``release_dir``, whichever compression it was shipped with."""
    base = relpath
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    for suffix in ("", ".xz", ".zst", ".gz"):
        path = release_dir / (base + suffix)
        if path.is_file():
            return decompress(path.name, path.read_bytes())
    raise AssetError(f"module file {base} is listed in modules.order but missing from {release_dir}")


def load_order(wanted: Iterable[str], paths: dict[str, str], read: Callable[[str], bytes],
               builtin: Iterable[str] = ()) -> list[str]:
    """The modules to ``insmod``, dependencies first: ``wanted`` and everything they depend on.

    ``paths`` is :func:`index`'s map, ``read(relpath)`` gives a module's plain ELF, ``builtin``
    names modules built into the kernel (``modules.builtin``), which are dropped. Among modules
    that do not depend on each other, ``wanted``'s order is kept, so a list written in a sensible
    order comes back unchanged. Raises :class:`AssetError` for an unknown module or a cycle.
    """
    builtin = {module_name(b) for b in builtin}
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        name = name.replace("-", "_")
        if name in order or name in builtin:
            return
        if name in visiting:
            raise AssetError(f"kernel modules depend on each other in a cycle: {' -> '.join(visiting + [name])}")
        if name not in paths:
            by = f" (needed by {needed_by})" if needed_by else ""
            raise AssetError(f"kernel module {name}{by} is not in this kernel package's modules.order")
        visiting.append(name)
        try:
            deps = depends(read(paths[name]))
        except ValueError as e:
            raise AssetError(f"kernel module {paths[name]}: {e}") from None
        for dep in deps:
            visit(dep, name)
        visiting.pop()
        order.append(name)

    for name in wanted:
        visit(name, None)
    return order
