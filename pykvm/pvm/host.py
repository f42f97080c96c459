"""Which kind of host backs /dev/kvm, what a user should expect there, and the kernel arguments that
steer a Linux guest around KVM-PVM's emulation gaps. Plain Python: files under /sys and /proc only.
"""

from __future__ import annotations

import os

KVM_PVM = "KVM-PVM"
INTEL_VTX = "Intel VT-x"
AMD_V = "AMD-V"
UNKNOWN = "unknown"


def _loaded_modules(sys_module: str, proc_modules: str) -> set[str]:
    names = set()
    try:
        names.update(os.listdir(sys_module))   # loaded modules and built-ins with parameters
    except OSError:
        pass
    try:
        with open(proc_modules) as f:            # absent in some containers
            names.update(line.split(" ", 1)[0] for line in f if line.strip())
    except OSError:
        pass
    return names


def _cpu_flags(cpuinfo: str) -> set[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def host_kind(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo",
              proc_modules: str = "/proc/modules") -> str:
    """What backs /dev/kvm here: "KVM-PVM", "Intel VT-x", "AMD-V" or "unknown".

    KVM has one vendor module at a time (kvm_intel, kvm_amd or kvm_pvm register the same
    kvm_x86_ops), so a loaded module answers first; kvm_pvm wins even on a CPU with vmx/svm, since
    it is then what /dev/kvm drives. Without any of them (KVM not loaded, or /sys hidden in a
    container) the CPU flags say what KVM *would* use. The paths are parameters for tests."""
    modules = _loaded_modules(sys_module, proc_modules)
    if "kvm_pvm" in modules:
        return KVM_PVM
    if "kvm_intel" in modules:
        return INTEL_VTX
    if "kvm_amd" in modules:
        return AMD_V
    flags = _cpu_flags(cpuinfo)
    if "vmx" in flags:
        return INTEL_VTX
    if "svm" in flags:
        return AMD_V
    return UNKNOWN


_PVM_NOTICE = (
    "This host's /dev/kvm is KVM-PVM (no VT-x/AMD-V): guest kernel code (CPL0) is emulated "
    "instruction by instruction, so a Linux boot takes tens of seconds to minutes to reach init; guest user "
    "mode cannot run (a syscall from CPL3 faults), so boots stop at the kernel's \"Run /init\". "
    "pykvm adds kernel arguments that hide CPU features the emulator lacks, completes a few "
    "instructions it cannot emulate (int3, fwait, ldmxcsr/stmxcsr, clac/stac, popcnt), and skips "
    "boot work only guest userland would notice, such as crypto self-tests (--no-pvm-skip-busywork "
    "keeps it). A distribution's standard kernel takes many minutes to reach init here (Debian's: "
    "5-13 on a shared 2-core machine); a small kernel built for VMs, tens of seconds.")


def host_notice(kind: str | None = None) -> str:
    """A paragraph for the CLI to print about what to expect on this host ("" where nothing is odd)."""
    kind = host_kind() if kind is None else kind
    return _PVM_NOTICE if kind == KVM_PVM else ""


# ---- kernel arguments for a Linux guest on a KVM-PVM host ----

# KVM_SET_CPUID2 is ignored here: the guest's CPUID sees the host's features, and Linux patches
# instructions for them into itself (alternatives). We hide features with arguments instead.
# `clearcpuid=` takes X86_FEATURE_* numbers (word * 32 + bit, arch/x86/include/asm/cpufeatures.h);
# 6.1 takes only numbers, later kernels names too. Words 4, 6, 9 and 16 have kept their numbering.
# Each entry: (feature number, name, why).
_CLEARED_FEATURES: list[tuple[int, str, str]] = [
    # Proven necessary (docs/kvm-pvm.md): without these a 6.1 kernel stops at the first use.
    # complete_gap handles both, but each completion costs ~130 us here (measured: a CPL0 loop of
    # 2000 popcnts, 129 us per iteration against 3.7 us with a mov in its place), the price of
    # some 30 emulated instructions: the kernel's own fallbacks are cheaper.
    (308, "smap", "clac/stac around every user access: not emulated; an exit per copy_from_user"),
    (151, "popcnt", "hweight*() is patched to popcnt: not emulated; __sw_hweight64 is ~20 "
                    "emulated instructions"),
    # Gaps seen here that the VMM does not complete.
    (141, "cx16", "SLUB's this_cpu_cmpxchg_double uses cmpxchg16b: not emulated"),
    # Pre-emptive: instructions KVM's emulator has no entry for, used by a kernel when present.
    (288, "fsgsbase", "rd/wr{fs,gs}base in the entry code and context switch"),
    (298, "invpcid", "invpcid in TLB flushes"),
    (534, "rdpid", "rdpid in the paranoid entry path (with fsgsbase) and getcpu"),
    (158, "rdrand", "rdrand at boot (rdrand self-test, random pool seeding)"),
    (306, "rdseed", "rdseed likewise"),
    (150, "movbe", "movbe in some crypto and checksum routines"),
    (197, "abm", "lzcnt/tzcnt in bitops when compiled for them"),
    # SIMD in the kernel (between kernel_fpu_begin/end): with these visible, a stock kernel picks
    # its SSSE3/SSE4/PCLMUL/AES routines (blake2s for the RNG, CRCs, crypto), whose SSE
    # instructions the emulator does not run (seen: `movd xmm15, ecx` in Debian 6.1 at boot).
    # Hidden, it uses the generic C versions.
    (137, "ssse3", "blake2s_compress_ssse3 and other SSSE3 routines: SSE at CPL0 is not emulated"),
    (147, "sse4_1", "SSE4.1 routines (crc, raid6)"),
    (148, "sse4_2", "crc32 instruction routines (crc32c-intel)"),
    (129, "pclmulqdq", "carry-less multiply CRC and GHASH routines"),
    (153, "aes", "AES-NI routines"),
    (291, "bmi1", "andn/bextr/tzcnt"),
    (296, "bmi2", "shlx/sarx/pdep/pext"),
    # Redundant with `noxsave` (clearing XSAVE clears what depends on it) but harmless; listed so
    # a kernel that ignores noxsave still keeps its FPU code on fxsave/fxrstor.
    # Speed, not gaps: with ERMS/FSRM, memcpy, memset and clear_page are one `rep movsb`/`stosb`,
    # which KVM's emulator steps through one byte at a time (an iteration per byte, each with its
    # guest page-table walks); without them the kernel takes its REP_GOOD variants, `rep movsq`/
    # `stosq`, 8 bytes a step. Measured on the test kernel's boot (64 MiB, two boots side by side):
    # memcpy/memset/clear_page went from 12.0% of the samples to 2.3%, the boot 4% shorter;
    # most of it is unpacking the initramfs (its 2 MB busybox copied into the page cache).
    (297, "erms", "memcpy/memset as byte-wise rep movsb/stosb: 8x the emulated steps of movsq"),
    (580, "fsrm", "the same for short copies (memmove and friends)"),
    (154, "xsave", "xsave/xrstor in FPU context switch: xrstor is not emulated"),
    (155, "osxsave", "follows xsave"),
    (156, "avx", "AVX crypto/raid code needs xsave-managed state"),
    (293, "avx2", "likewise"),
]

# (argument, why). Order is the order on the command line.
_KERNEL_ARGS: list[tuple[str, str]] = [
    ("noxsave", "FPU state via fxsave/fxrstor: xrstor is an emulation gap (0f ae /5)"),
    ("nosmap", "no clac/stac patched into user accesses (same as clearcpuid=308, by name)"),
    ("nofsgsbase", "keep CR4.FSGSBASE off: rd/wr{fs,gs}base are not emulated"),
    ("noinvpcid", "no invpcid instruction in TLB flushes"),
    ("nopcid", "no PCIDs in CR3: PVM shadows the guest's page tables, PCID buys nothing"),
    ("nokaslr", "kernel text at its link address: a gap's RIP reads straight against System.map; "
                "loading the payload decompressed already skips KASLR, this makes it explicit"),
    # An SMP kernel started with one CPU rewrites every `lock` prefix in its text to a harmless
    # DS prefix (arch/x86/kernel/alternative.c, alternatives_smp_unlock), one text_poke() per
    # site: each switches to a temporary mm and back and flushes the TLB, and on KVM-PVM every
    # CR3 write rebuilds shadow page tables. The test kernel has ~5,000 sites ("Freeing SMP
    # alternatives memory: 20K", 4 bytes each); a distribution kernel several times that. A
    # `lock` prefix costs an emulated instruction nothing, so keeping them is free.
    ("noreplace-smp", "keep lock prefixes on one CPU: no text_poke (two CR3 switches) per site"),
    # Once the initramfs is unpacked, Linux frees the pages that held the archive: on x86 it
    # makes each one writable and non-executable again (set_memory_nx/rw) and fills it with 0xcc
    # (free_reserved_area, POISON_FREE_INITMEM) - a `rep stosb` the emulator steps through byte
    # by byte, 4096 times a page: ~2 M steps for pykvm's 2 MB busybox archive, ~25 M for a
    # 100 MB initramfs. Keeping the archive costs the guest its size in RAM.
    ("retain_initrd", "do not poison and free the initramfs archive's pages after unpacking"),
    # x86_64 embeds each CPU's first per-CPU chunk in the direct map in units of PMD_SIZE
    # (setup_per_cpu_areas: pcpu_embed_first_chunk, atom_size 2 MiB), and memblock hands each
    # unit over zeroed: 2 MiB of `rep stos` per possible CPU for the test kernel's ~160 KiB of
    # per-CPU data ("percpu: Embedded 41 pages/cpu ... u2097152"). "page" maps the same data
    # 4 KiB page by page. Measured: setup_per_cpu_areas 2.8 s -> 0.7 s of guest clock, two boots
    # side by side; memblock_alloc_try_nid's zeroing 257 -> 40 samples.
    ("percpu_alloc=page", "per-CPU areas in 4 KiB pages, not a zeroed 2 MiB unit per CPU"),
]


# Linux 6.1 reads one `clearcpuid=`, the last on the line, into a 128-byte buffer
# (arch/x86/kernel/cpu/common.c, cpu_parse_early_param: `char arg[128]`; arch/x86/lib/cmdline.c,
# cmdline_find_option: "returns the last instance"). A longer value is cut short without a word.
CLEARCPUID_MAX = 127


def merge_clearcpuid(user_value: str) -> str:
    """The `clearcpuid=` value for a user who gave one: theirs first, then pykvm's features they did
    not list. A second `clearcpuid=` would make the kernel ignore the first (only the last counts),
    so one of the two lists would be lost: the user's would, silently, if pykvm just added its own.
    Raises ValueError, naming the fix, when the merged list no longer fits the kernel's buffer."""
    items = [item for item in user_value.split(",") if item]
    items += [str(n) for n, _, _ in _CLEARED_FEATURES if str(n) not in items]
    merged = ",".join(items)
    if len(merged) > CLEARCPUID_MAX:
        raise ValueError(
            f"clearcpuid= merged with pykvm's KVM-PVM list is {len(merged)} characters; Linux reads "
            f"at most {CLEARCPUID_MAX}: clear fewer features, or take over the whole list yourself "
            f"with --no-pvm-workarounds")
    return merged


def pvm_kernel_args() -> list[str]:
    """Kernel arguments a Linux guest needs on a KVM-PVM host (docs/kvm-pvm.md: this set reached "Run
    /init" with a 6.1 kernel). Harmless on VT-x/AMD-V hosts, but slower there; add them only when
    `host_kind() == "KVM-PVM"`. Each one's reason is in _KERNEL_ARGS / _CLEARED_FEATURES."""
    cleared = ",".join(str(n) for n, _, _ in _CLEARED_FEATURES)
    return [arg for arg, _ in _KERNEL_ARGS] + [f"clearcpuid={cleared}"]


def add_pvm_args(cmdline, extra: list[str] = ()) -> list[str]:
    """Add pvm_kernel_args() and `extra` to a `pykvm.boot.cmdline.Cmdline`; returns what was added.

    A key the user already set keeps the user's value (their `nosmap`, their `rodata=`), except
    `clearcpuid=`: the kernel reads only the last one, so the user's list and pykvm's become one
    (merge_clearcpuid; ValueError when it does not fit)."""
    added = []
    for arg in pvm_kernel_args() + list(extra):
        key, _, value = arg.partition("=")
        if key == "clearcpuid" and cmdline.has(key):
            merged = merge_clearcpuid(cmdline.get(key))
            cmdline.replace(key, merged)
            added.append(f"{key}={merged}")
        elif not cmdline.has(key):
            cmdline.add(key, value or None)
            added.append(arg)
    return added
