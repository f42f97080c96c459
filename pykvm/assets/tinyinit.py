"""A 200-byte /init: print the userland marker, power off. For the fastest boot tests.

Unpacking the busybox initramfs (2 MB) is the largest single cost of a boot
on KVM-PVM hosts, where the kernel's copy loops are emulated: ~25 s of guest
time. An initramfs holding only this program (plus /dev/console) costs
nothing to unpack, and still shows that the kernel found and started /init.

The program is a static x86-64 ELF with one loadable segment, written out
here byte by byte (no toolchain needed). Its code, as ``as`` assembles it::

     0: b8 01 00 00 00        mov  eax, 1             ; write(
     5: bf 01 00 00 00        mov  edi, 1             ;   fd 1 = /dev/console, opened by the kernel,
     a: 48 8d 35 2c 00 00 00  lea  rsi, [rip+0x2c]    ;   the message at offset 0x3d,
    11: ba LL LL LL LL        mov  edx, len           ;   its length)
    16: 0f 05                 syscall
    18: b8 a9 00 00 00        mov  eax, 169           ; reboot(
    1d: bf ad de e1 fe        mov  edi, 0xfee1dead    ;   LINUX_REBOOT_MAGIC1,
    22: be 69 19 12 28        mov  esi, 0x28121969    ;   LINUX_REBOOT_MAGIC2,
    27: ba dc fe 21 43        mov  edx, 0x4321fedc    ;   LINUX_REBOOT_CMD_POWER_OFF,
    2c: 45 31 d2              xor  r10d, r10d         ;   NULL)
    2f: 0f 05                 syscall
    31: b8 3c 00 00 00        mov  eax, 60            ; if that failed: exit(1)
    36: bf 01 00 00 00        mov  edi, 1             ; (as PID 1 the kernel then panics,
    3b: 0f 05                 syscall                 ;  "Attempted to kill init")
    3d: the message

Without ACPI the test kernel cannot really power off: it prints
``reboot: Power down`` and halts, which a VMM can take as the end of the run.
On KVM-PVM hosts no user code runs at all (docs/kvm-pvm.md), so there the boot
ends at the kernel's "Run /init as init process" either way.
"""

from __future__ import annotations

import struct

LOAD_ADDRESS = 0x400000
_EHDR_SIZE = 64
_PHDR_SIZE = 56
_CODE = bytes.fromhex(
    "b801000000" "bf01000000" "488d352c000000" "ba00000000" "0f05"
    "b8a9000000" "bfaddee1fe" "be69191228" "badcfe2143" "4531d2" "0f05"
    "b83c000000" "bf01000000" "0f05"
)
_LEN_OFFSET = 0x12  # the imm32 of `mov edx, len`
assert len(_CODE) == 0x3D


def tiny_init(message: str) -> bytes:
    """The ELF executable that writes ``message`` to fd 1 and powers the machine off."""
    text = message.encode()
    code = bytearray(_CODE)
    code[_LEN_OFFSET:_LEN_OFFSET + 4] = struct.pack("<I", len(text))
    body = bytes(code) + text
    size = _EHDR_SIZE + _PHDR_SIZE + len(body)
    entry = LOAD_ADDRESS + _EHDR_SIZE + _PHDR_SIZE
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF",  # 0x00 e_ident[EI_MAG]
        2,  # 0x04 EI_CLASS: ELFCLASS64
        1,  # 0x05 EI_DATA: little-endian
        1,  # 0x06 EI_VERSION
        0,  # 0x07 EI_OSABI: System V
        0,  # 0x08 EI_ABIVERSION
        b"\0" * 7,  # 0x09 padding
        2,  # 0x10 e_type: ET_EXEC
        62,  # 0x12 e_machine: EM_X86_64
        1,  # 0x14 e_version
        entry,  # 0x18 e_entry
        _EHDR_SIZE,  # 0x20 e_phoff: the program header follows this header
        0,  # 0x28 e_shoff: no sections
        0,  # 0x30 e_flags
        _EHDR_SIZE,  # 0x34 e_ehsize
        _PHDR_SIZE,  # 0x36 e_phentsize
        1,  # 0x38 e_phnum
        0, 0, 0,  # 0x3a e_shentsize, e_shnum, e_shstrndx
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        1,  # 0x00 p_type: PT_LOAD
        5,  # 0x04 p_flags: R + X
        0,  # 0x08 p_offset: the whole file ...
        LOAD_ADDRESS,  # 0x10 p_vaddr: ... mapped here
        LOAD_ADDRESS,  # 0x18 p_paddr
        size,  # 0x20 p_filesz
        size,  # 0x28 p_memsz
        0x1000,  # 0x30 p_align
    )
    assert len(ehdr) == _EHDR_SIZE and len(phdr) == _PHDR_SIZE
    return ehdr + phdr + body
