"""Boot-time busywork a Linux guest can skip on a KVM-PVM host, because only guest userland would
ever notice it - and guest userland cannot run there.

Why this is honest: on KVM-PVM every kernel (CPL0) instruction is emulated, ~0.5-1 us each, so an
initcall that parses 100,000 BTF types or self-tests every crypto algorithm costs minutes of wall
time. And a `syscall` from guest CPL3 faults there (docs/kvm-pvm.md): no /init, no shell, no
auditd, no BPF loader, no tracefs reader, no modprobe will ever run. Work whose only consumer is
userland is therefore invisible on such a host, and skipping it changes nothing a user can see.
Each entry says what it skips, why only userland notices, and what it cost where it was measured.

pykvm adds these only when the host is KVM-PVM and the user has not turned them off
(`pykvm boot --no-pvm-skip-busywork`, `MachineConfig(pvm_skip_busywork=False)`), and the CLI
shows them in its banner. A user's own value for a key wins (as for root=), except
`initcall_blacklist`, which the kernel accumulates over every occurrence (init/main.c,
initcall_blacklist(): each `initcall_blacklist=` adds its comma list), so ours is added beside
the user's.

What is *not* here, though the Debian cloud-kernel test passes it: arguments that change how the
kernel itself keeps time or handles interrupts (no-kvmclock, highres=off, tsc=reliable,
noirqdebug). They trim the emulated timer tick, but kernel code can see their effect, so they
stay the user's choice.

The figures below are host wall time on this project's KVM-PVM machines (2 shared cores), from
booting Debian's 6.1 cloud kernel with and without each argument (when its test was written); they
vary with load. Debian's standard kernel was measured with the whole set only (docs/kvm-pvm.md).
"""

from __future__ import annotations

# The kernel calls the handler of `initcall_blacklist=` once per occurrence, appending to one
# list, so several occurrences add up rather than the last one winning.
ADDITIVE_KEYS = {"initcall_blacklist"}

# Initcalls skipped with initcall_blacklist=: (function name, what it does, why only userland
# notices). The kernel compares names only: a name a given kernel does not have is ignored, so the
# list fits the test kernel (which has few of them built in) and Debian's kernels alike.
_SKIPPED_INITCALLS: list[tuple[str, str]] = [
    # kernel/trace/ftrace.c. ~37,000 ftrace records, each looked up in kallsyms (a linear walk of
    # the symbol names) to hide overridden weak functions from the tracer: minutes here. Only a
    # tracefs reader (userland) sees the list of traceable functions.
    ("ftrace_check_for_weak_functions", "tracefs's available_filter_functions (userland)"),
    # kernel/trace/trace.c and trace_events.c: rewriting enum names in every event's print format
    # and building tracefs's tree of ~2,000 event directories: ~5 minutes on the cloud kernel.
    ("trace_eval_init", "event formats in tracefs (userland)"),
    ("tracer_init_tracefs", "the tracefs directory tree (userland)"),
    # The first BPF kfunc set registration parses and checks the kernel's whole BTF (~100,000
    # types, ~4 minutes on the cloud kernel); later ones search it by name. Kfuncs are called only
    # by BPF programs, which userland loads. tcp_cubic registers its kfuncs before CUBIC itself,
    # so it goes too: TCP's default congestion control is then reno (kernel-mode TCP, e.g. an NFS
    # root, still works; only its congestion behaviour differs).
    ("cubictcp_register", "BPF kfuncs of CUBIC (BPF programs come from userland); TCP uses reno"),
    ("kfunc_init", "BPF kfunc sets (userland BPF programs)"),
    ("bpf_rstat_kfunc_init", "BPF kfunc sets (userland BPF programs)"),
    ("bpf_key_sig_kfuncs_init", "BPF kfunc sets (userland BPF programs)"),
    ("bpf_prog_test_run_init", "BPF_PROG_TEST_RUN kfuncs (the bpf() syscall)"),
    ("bpf_tcp_ca_kfunc_init", "BPF TCP congestion-control kfuncs (userland BPF programs)"),
    # lib/crypto/blake2s.c: the BLAKE2s library's self-test, hundreds of hashes (~35 s on the
    # cloud kernel). The RNG's BLAKE2s itself is untouched; a failed self-test only logs.
    ("blake2s_mod_init", "a self-test that only logs"),
    # certs/system_keyring.c: parsing the built-in X.509 keys checks an RSA signature (~40 s on
    # the cloud kernel). The keys verify signed modules, which modprobe (userland) loads; with
    # emulated RSA this is also where Debian's standard kernel printed "-110" after 700 s.
    ("load_system_certificate_list", "module signature keys (modprobe is userland)"),
    # mm/slub.c: /sys/kernel/slab, ~40 files for each of ~200 caches (~45 s on the cloud kernel).
    ("slab_sysfs_init", "/sys/kernel/slab (userland tools read it)"),
]

# Other arguments: (argument, what it skips and why only userland notices).
_SKIPPED_ARGS: list[tuple[str, str]] = [
    # crypto/algboss.c: each algorithm registered at boot is tested against its test vectors by
    # a cryptomgr thread. Emulated, RSA and the like take minutes: crypto_larval_wait() gives up
    # after 60 s with -ETIMEDOUT (the -110 above). The result shows in /proc/crypto (userland).
    ("cryptomgr.notests", "crypto self-tests (their result is shown in /proc/crypto)"),
    # mm/page_alloc.c: Debian builds with INIT_ON_ALLOC_DEFAULT_ON, zeroing every allocated page
    # so no stale data can leak to userland. Kernel code zeroes what it needs (__GFP_ZERO) anyway.
    ("init_on_alloc=0", "zeroing every allocation (hardening against leaks to userland)"),
    # kernel/audit.c: audit records describe syscalls and are read by auditd.
    ("audit=0", "the audit subsystem (syscall records for auditd)"),
    # Speculative-execution mitigations guard the kernel against userland (and guests of its
    # own); with no userland there is no attacker, and no retpoline/IBRS/entry patching to do.
    ("mitigations=off", "Spectre/Meltdown mitigations (they guard against userland)"),
    # kernel/sched/psi.c: pressure stall accounting at every context switch, read from
    # /proc/pressure by userland.
    ("psi=0", "pressure-stall accounting (/proc/pressure, userland)"),
    # kernel/watchdog.c: the soft/hard lockup detectors compare wall time with the CPU's progress;
    # with every instruction emulated they raise false alarms (soft lockups at 95-124 s were seen
    # booting Debian's standard kernel here) and each report prints stacks on the slow console.
    ("nowatchdog", "lockup detectors, false alarms under emulation"),
]


def busywork_args() -> list[str]:
    """The arguments, in command-line order: the plain ones, then one initcall_blacklist list."""
    return [arg for arg, _ in _SKIPPED_ARGS] + [
        "initcall_blacklist=" + ",".join(name for name, _ in _SKIPPED_INITCALLS)]


def skipped_description() -> list[tuple[str, str]]:
    """(argument or initcall, what skipping it costs) for documentation and `pykvm info`."""
    return list(_SKIPPED_ARGS) + [(f"initcall {n}", why) for n, why in _SKIPPED_INITCALLS]


def add_busywork_args(cmdline) -> list[str]:
    """Add busywork_args() to a pykvm.boot.cmdline.Cmdline; return those added. A key the user
    gave keeps the user's value; initcall_blacklist is added beside the user's (ADDITIVE_KEYS)."""
    added = []
    for arg in busywork_args():
        key, _, value = arg.partition("=")
        if key in ADDITIVE_KEYS or not cmdline.has(key):
            cmdline.add(key, value or None)
            added.append(arg)
    return added
