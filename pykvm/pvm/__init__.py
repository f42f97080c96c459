"""What a KVM-PVM host needs from a VMM: detection, kernel arguments, and completing emulation gaps.

KVM-PVM ("pagetable-based virtual machine", kernel module `kvm_pvm`) gives a /dev/kvm with the normal
API on machines that have no VT-x / AMD-V, typically because they are VMs themselves. Guest CPL3 runs
natively; guest CPL0 is executed instruction by instruction by KVM's x86 emulator (~0.5-1 us each).
Where that emulator has no entry for an instruction, KVM_RUN returns KVM_EXIT_INTERNAL_ERROR with
suberror KVM_INTERNAL_ERROR_EMULATION and RIP still at the instruction (docs/kvm-pvm.md).

This package:

1. tells which kind of host this is: `host_kind()`, and what a user should expect: `host_notice()`;
2. lists the kernel arguments that steer a Linux guest around the gaps: `pvm_kernel_args()`,
   `add_pvm_args(cmdline)` (which merges a `clearcpuid=` of the user's with pykvm's), and
   those that skip boot work only guest userland would notice (which cannot run here):
   `busywork_args()`, `add_busywork_args(cmdline)`;
3. completes a few gaps in the VMM: `complete_gap(machine, exit)`, registered in
   `machine.internal_error_handlers`. It reads RIP and the segment state, translates RIP with
   KVM_TRANSLATE, reads the instruction bytes from guest memory, decodes them with iced-x86 and does
   what the CPU would have done:

       int3                 RIP += 1, then inject #BP (a trap: the handler sees the next RIP)
       fwait / wait         a no-op (pending x87 exceptions are not modelled)
       ldmxcsr / vldmxcsr   MXCSR <- m32, through KVM_GET/SET_XSAVE (not KVM_GET/SET_FPU: see below)
       stmxcsr / vstmxcsr   m32 <- MXCSR
       clac / stac          RFLAGS.AC <- 0 / 1
       popcnt r, r/m        r <- number of set bits; ZF = (source == 0); OF SF AF CF PF <- 0

   Anything else is run again once, unchanged (another vCPU may have rewritten the code since
   KVM looked: Linux's text_poke_bp; see gaps.py), then left alone (returns False) and
   `describe_gap()` names it for the VMM's error.

The package is split four ways: `host.py` (which host, what to expect, kernel arguments; plain
Python), `busywork.py` (the boot work only userland would notice, skipped: each argument with its
reason), `instructions.py` (pure functions over bytes and a register dict: `decode`,
`effective_address`, `linear_address`, `popcnt`, `complete_instruction`, testable with no
/dev/kvm) and `gaps.py`, the KVM side (`complete_gap`, `describe_gap`, `StuckVmcall`), which only reads the
vCPU's state into such a dict and writes the resulting `Completion` back. None of them imports the
compiled binding at load time.

Other things measured here: `fxsave` at CPL0 is not a gap but raises #UD in the guest; KVM_GET_FPU
does not report MXCSR (see _get_xsave); each completed gap costs ~130 us.

Shortcuts, admitted: segment limits and page permissions (a store to a read-only page) are not
checked; a pending unmasked x87 exception does not turn `fwait` into #MF; RFLAGS.TF single-stepping over
a completed instruction does not raise #DB; the VEX forms do not check XCR0. None of these matter to
a Linux kernel booting here.
"""

# The public names, as `from pykvm import pvm; pvm.host_kind()` has always found them. host.py's
# are plain Python and loaded at once; those of instructions.py and gaps.py on first use (PEP
# 562), because they load iced-x86's decoder - a large share of a restored VM's start-up, for a
# gap that may never come.
import time

from .busywork import add_busywork_args, busywork_args, skipped_description
from .host import (AMD_V, INTEL_VTX, KVM_PVM, UNKNOWN, add_pvm_args, host_kind, host_notice,
                   merge_clearcpuid, pvm_kernel_args)

_INSTRUCTIONS = ("AC", "AF", "BP", "CF", "CR4_OSXSAVE", "GP", "GPRS", "MAX_INSN", "NM", "OF", "PF",
                 "PF_", "SF", "SUPPORTED", "UD", "ZF", "Completion", "PageFault",
                 "complete_instruction", "decode", "effective_address", "format_instruction",
                 "linear_address", "mnemonic", "popcnt", "write_gpr")
_GAPS = ("StuckVmcall", "complete_gap", "describe_gap", "read_linear", "write_linear")


def __getattr__(name: str):
    if name in _INSTRUCTIONS:
        from . import instructions as module
    elif name in _GAPS:
        from . import gaps as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def complete_gap_lazily(machine, exit) -> bool:
    """`complete_gap`, for `Machine.internal_error_handlers`, loading gaps.py at the first gap."""
    from .gaps import complete_gap
    return complete_gap(machine, exit)


class LazyStuckVmcall:
    """A `StuckVmcall` made at its first check (the first watchdog kick, a second into a run),
    looking at most every MIN_INTERVAL seconds per vCPU.

    The watchdog kicks once a second for it, but other kicks land on the same Interrupted exits:
    the user irqchip's PIT deadline (every timer tick, 100 a second for Linux) and the profiler's
    sampling. Each look reads the registers, fetches the code at RIP and decodes it, ~200 us of
    VMM time measured on KVM-PVM: with --irqchip user that was the largest part of the VMM's
    share of a boot. A vmcall that never returns is still caught two looks after it starts."""

    MIN_INTERVAL = 0.25

    def __init__(self, clock=time.monotonic):
        self._impl = None
        self._clock = clock
        self._last: dict[int, float] = {}       # vCPU index -> when it was last looked at

    def check(self, machine) -> bool:
        key = getattr(machine.vcpu, "index", 0)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.MIN_INTERVAL:
            return False
        self._last[key] = now
        if self._impl is None:
            from .gaps import StuckVmcall
            self._impl = StuckVmcall()
        return self._impl.check(machine)
