"""Where the lane's L1 CPU - QEMU 7.2's TCG emulating AMD's SVM - differs from AMD hardware, and the
one guest-kernel warning the lane's checks tolerate because of it.

**XSETBV is not intercepted.** KVM asks the CPU to intercept XSETBV in every guest (svm.c,
init_vmcb: INTERCEPT_XSETBV; AMD APM vol. 2, ch. 15, "Instruction Intercepts", exit code 0x8D): the
guest's write to XCR0 (which XSAVE state components the OS has turned on; SDM vol. 1, 13.3) then
goes through kvm_set_xcr, and KVM keeps the guest's CPUID leaf 0xD in step with it -
CPUID.(EAX=0DH,ECX=0):EBX is "the size of the XSAVE area for the components *currently set* in
XCR0" (SDM vol. 1, 13.2), which kvm_update_cpuid_runtime recomputes from vcpu->arch.xcr0. QEMU 7.2's
translator never checks that intercept (its xsetbv case in target/i386/tcg/translate.c calls
helper_xsetbv directly; the check, gen_svm_check_intercept(s, SVM_EXIT_XSETBV), came with
"target/i386: check intercept for XSETBV", October 2023, after 7.2). So an L2 guest's XSETBV
changes TCG's XCR0 and L1's KVM never hears of it: KVM_GET_XCRS still says XCR0 = 1 (x87, its
reset value), and CPUID 0xD.0 EBX stays 576 (the legacy area and the XSAVE header), whatever L2
enabled.

Linux checks exactly that at boot (arch/x86/kernel/fpu/xstate.c, paranoid_xstate_size_valid): it
enables x87|SSE|AVX (XCR0 = 7, an 832-byte area: 576 + AVX's 256 at offset 576), asks CPUID 0xD.0
EBX, gets 576, and WARNs once - "XSAVE consistency problem: size 832 != kernel_size 576" with a
register dump and call trace, then the CPUID leaves - before it falls back to FXSAVE
(fpu__init_disable_system_xstate). Every Linux L2 in the lane prints it; L1's own boot, where TCG
answers CPUID itself from its own XCR0, does not ("Enabled xstate features 0x7, context size is 832
bytes"); nor does QEMU offer L1 XSAVE features TCG lacks: for -cpu EPYC it drops XSAVEC ("TCG
doesn't support requested feature: CPUID.0DH:EAX.xsavec", in qemu.log), leaving L1 xsave,
xsaveopt, avx and avx2, the standard format. Not pykvm's: the same two reads after a guest's
XSETBV come out the same way from a raw C KVM program in L1 (measured 2026-12-03, Debian's QEMU
7.2, L1 6.1.0-57 kvm_amd: XCR0 written 7, KVM_GET_XCRS 1, CPUID 0xD.0 EBX 576; on KVM-PVM: 7 and
832; tests/c/raw_kvm_debug.c keeps the check), and pykvm passes leaf 0xD from
KVM_GET_SUPPORTED_CPUID unchanged (pykvm/x86/cpu.py, setup_cpuid).

So the lane's checks tolerate that one WARN, word for word, and only on a host where
`xsetbv_reaches_kvm()` - the same experiment, run there and then - says KVM did not see a guest's
XSETBV. Anywhere else (real AMD-V or VT-x, KVM-PVM, a QEMU with the intercept) it counts as any
other warning. The other TCG gaps the lane has (int3 and DR0-DR3 breakpoints in L2) are in
docs/kvm-pvm.md, "Single-step and debug".
"""

from __future__ import annotations

from ..testing.kernellog import Splat, kernel_splats

# What Linux 6.1 prints for it with the lane's CPU model (-cpu EPYC: x87, SSE, AVX; 832 bytes).
XSAVE_SPLAT = "XSAVE consistency problem: size 832 != kernel_size 576"

# The probe: a real-mode guest at 0x1000 that sets XCR0 to x87|SSE, the smallest change from the
# reset value any XSAVE-capable CPU allows (bit 0 must stay set; SSE is always there on x86-64).
_XCR0 = 0x3
_SET_XCR0_AND_HALT = bytes([
    0x66, 0x31, 0xC9,                          # xor ecx, ecx        (XCR number 0)
    0x66, 0xB8, _XCR0, 0x00, 0x00, 0x00,       # mov eax, 3
    0x66, 0x31, 0xD2,                          # xor edx, edx
    0x0F, 0x01, 0xD1,                          # xsetbv
    0xF4,                                      # hlt
])


def xsetbv_reaches_kvm() -> bool | None:
    """Does a guest's XSETBV reach this host's KVM? Runs the probe guest (pykvm's own CPUID set-up,
    CR4.OSXSAVE on) and reads XCR0 back with KVM_GET_XCRS: True if it is what the guest wrote, False
    if not (the lane's TCG), None if this host's KVM cannot run the probe (no XSAVE for guests)."""
    from ..kvm import KvmError
    from ..machine import Machine
    from ..stop import StopReason
    from ..x86 import cpu

    with Machine(1 << 20, irqchip="none") as m:
        cpu.setup_cpuid(m.kvm, m.vcpu)
        m.mem.write(0x1000, _SET_XCR0_AND_HALT)
        cpu.setup_real_mode(m.vcpu, 0x100, 0)
        sregs = m.vcpu.get_sregs()
        sregs.cr4 |= cpu.CR4_OSXSAVE
        try:
            m.vcpu.set_sregs(sregs)   # refused (EINVAL) if the guest's CPUID has no XSAVE
        except KvmError:
            return None
        stop = m.run(timeout=60)
        if stop.reason != StopReason.HALT:
            raise RuntimeError(f"the XSETBV probe guest did not halt: {stop}")
        xcrs = m.vcpu.get_xcrs()
        xcr0 = next((xcrs.xcrs[i].value for i in range(xcrs.nr_xcrs) if xcrs.xcrs[i].xcr == 0),
                    None)
    return xcr0 == _XCR0


def unexpected_splats(console: str, *, xsetbv_reaches_kvm: bool | None) -> list[Splat]:
    """The kernel's reports of trouble in a guest console log (pykvm.testing.kernellog), but for
    the known TCG one: a WARN whose message is exactly XSAVE_SPLAT, tolerated only when the
    probe said XSETBV does not reach KVM here (``xsetbv_reaches_kvm is False``)."""
    tolerate = xsetbv_reaches_kvm is False
    return [s for s in kernel_splats(console) if not (tolerate and s.message == XSAVE_SPLAT)]
