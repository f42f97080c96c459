"""Does this kernel know a command-line parameter? Read the answer from its image.

Every parameter a kernel parses is a NUL-terminated name somewhere in its image:

    __setup("audit=", audit_setup)              "audit=\\0"         (init.h: __setup_str_*)
    early_param("percpu_alloc", ...)            "percpu_alloc\\0"
    module_param(notests, ...) in cryptomgr     "cryptomgr.notests\\0"  (moduleparam.h: prefix + name)
    cmdline_find_option_bool(cmdline, "nopcid") "nopcid\\0"   (arch/x86/lib/cmdline.c, early CPU set-up)

So a name that is not in the image, followed by NUL or by "=" and NUL, is one the kernel cannot act
on. pykvm uses this to leave out the KVM-PVM arguments it would add (pykvm.pvm) that a given kernel
lacks: Linux 6.1 has no `nosmap` any more (it still parses `noxsave`, early in
arch/x86/kernel/cpu/common.c), and a small kernel has no audit, psi or watchdog. Left in, such an
argument is not free where every kernel instruction is emulated: the kernel parses the whole command
line once per initcall level (init/main.c, do_initcall_level: nine passes of parse_args, each
comparing every argument against every built-in module parameter), and an unknown one also goes
through unknown_bootoption and every __setup entry, then to init's argv or environment. Measured on
KVM-PVM (test kernel, 64 MiB, sampled with --profile): strlen, parse_args, next_arg, parameq and
unknown_bootoption were ~4.5 % of a boot's samples with pykvm's usual ~22 arguments, ~10 % with 22
unknown ones more. For the test kernel this leaves out six (nosmap, nokaslr, audit, psi,
cryptomgr.notests, and the 240-character initcall_blacklist, which a kernel without KALLSYMS ignores
after printing it three times on the console).

A false "knows" (the name happens to appear as a string for another reason) only keeps an
argument, as before. Matching is on the name as written: Linux treats '-' and '_' alike in
parameter names (kernel/params.c, parameqn), so pykvm spells its arguments as the kernel does.
"""

from __future__ import annotations


# Parameters whose handler some kernels build as a stub that only says so. The message in the image
# is the answer: init/main.c without CONFIG_KALLSYMS keeps initcall_blacklist= (so the name is there)
# but cannot look initcalls up by name, prints this and ignores the list.
_INERT = {"initcall_blacklist": b"initcall_blacklist requires CONFIG_KALLSYMS"}


def kernel_knows(image: bytes, key: str) -> bool:
    """True if `image` (a decompressed kernel) holds `key` as a parameter name (module docstring)
    and does not say that it ignores it."""
    name = key.encode()
    if key in _INERT and _INERT[key] in image:
        return False
    # One search for the name, the bytes after each hit checked: an unknown name costs one scan
    # of the whole image (~15 MiB for the test kernel, ~8 ms), where searching for name + "\0"
    # and then name + "=\0" took two, slower ones (NUL, 58 % of the image, is the needle's last
    # byte, on which CPython's search decides how far to skip). Measured on the test kernel with
    # pykvm's 17 KVM-PVM keys (6 unknown): 69 ms against 115 ms, best of 7 at load ~2; a
    # LinuxVM's whole construction is 0.12-0.2 s there.
    at = image.find(name)
    while at >= 0:
        end = at + len(name)
        if image[end:end + 1] == b"\0" or image[end:end + 2] == b"=\0":
            return True
        at = image.find(name, at + 1)
    return False


def unknown_keys(image: bytes, keys) -> list[str]:
    """The keys, in order, that `image` does not know."""
    return [key for key in keys if not kernel_knows(image, key)]
