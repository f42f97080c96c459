"""pykvm.pvm: host detection, kernel arguments, and completing KVM-PVM's emulation gaps.

Unit tests (no KVM) decode instruction bytes and compute operand addresses and results from a
register dict; the KVM tests run tiny 64-bit CPL0 guests whose instructions are gaps on KVM-PVM hosts.
"""

import struct

import iced_x86 as iced
import pytest
from hypothesis import given, settings, strategies as st

from pykvm import pvm
from pykvm.boot.cmdline import Cmdline
from pykvm.pvm import gaps
from pykvm.pvm import (AC, AF, CF, OF, PF, SF, ZF, PageFault, complete_instruction,
                       decode, effective_address, host_kind, linear_address, popcnt)

from conftest import kvm_unusable_reason

# ---------------------------------------------------------------------------------------------
# host_kind on fake /sys and /proc trees
# ---------------------------------------------------------------------------------------------


def _tree(tmp_path, modules=(), flags="fpu sse2", proc_modules=None):
    sysmod = tmp_path / "sys" / "module"
    sysmod.mkdir(parents=True)
    for m in modules:
        (sysmod / m).mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    pm = tmp_path / "modules"
    if proc_modules is not None:
        pm.write_text("".join(f"{m} 16384 0 - Live 0x0\n" for m in proc_modules))
    return dict(sys_module=str(sysmod), cpuinfo=str(cpuinfo), proc_modules=str(pm))


@pytest.mark.parametrize("modules, flags, proc, kind", [
    (["kvm", "kvm_pvm"], "fpu sse2 popcnt", None, "KVM-PVM"),
    (["kvm", "kvm_pvm"], "fpu vmx", None, "KVM-PVM"),          # kvm_pvm drives /dev/kvm
    ([], "fpu", ["kvm_pvm", "kvm"], "KVM-PVM"),                # only /proc/modules knows
    (["kvm", "kvm_intel"], "fpu vmx", None, "Intel VT-x"),
    (["kvm", "kvm_amd"], "fpu svm", None, "AMD-V"),
    ([], "fpu vmx ept", None, "Intel VT-x"),                   # KVM not loaded: the CPU says
    ([], "fpu svm npt", None, "AMD-V"),
    ([], "fpu sse2", None, "unknown"),
])
def test_host_kind(tmp_path, modules, flags, proc, kind):
    assert host_kind(**_tree(tmp_path, modules, flags, proc)) == kind


def test_host_kind_with_nothing_readable(tmp_path):
    missing = str(tmp_path / "nope")
    assert host_kind(missing, missing, missing) == "unknown"


def test_vmx_is_a_whole_word(tmp_path):
    assert host_kind(**_tree(tmp_path, [], "fpu vmxfake svmx")) == "unknown"


def test_host_notice():
    assert "Run /init" in pvm.host_notice("KVM-PVM") and "\n" not in pvm.host_notice("KVM-PVM")
    assert pvm.host_notice("Intel VT-x") == ""


def test_kernel_args():
    args = pvm.pvm_kernel_args()
    assert {"noxsave", "nosmap", "nokaslr", "nofsgsbase", "noinvpcid", "nopcid"} <= set(args)
    clear = [a for a in args if a.startswith("clearcpuid=")]
    assert len(clear) == 1     # one comma list: 6.1 parses a single clearcpuid=
    numbers = {int(n) for n in clear[0].split("=")[1].split(",")}
    # docs/kvm-pvm.md's set, which reached "Run /init": smap, popcnt proven necessary
    # The set that took a 6.1 kernel to "Run /init" here (docs/kvm-pvm.md) ...
    assert {141, 154, 155, 308, 288, 298, 534, 151, 197, 291, 296, 150, 156, 293, 158, 306} <= numbers
    # ... and the SIMD features whose kernel routines stopped Debian's stock kernel (movd xmm).
    assert {137, 147, 148, 129, 153} <= numbers
    assert all(" " not in a for a in args)

def test_pvm_args_meet_the_users_own():
    """A key the user set keeps their value; clearcpuid= becomes one list (6.1 reads the last)."""
    line = Cmdline("console=ttyS0 nokaslr clearcpuid=514,151 rodata=on")
    added = pvm.add_pvm_args(line, ["rodata=off"])
    assert line.get("rodata") == "on" and "rodata=off" not in added
    assert str(line).count("nokaslr") == 1 and "nokaslr" not in added
    assert str(line).count("clearcpuid=") == 1
    cleared = line.get("clearcpuid").split(",")
    assert cleared[:2] == ["514", "151"]                        # the user's first, in their order
    assert {"308", "141", "154"} <= set(cleared) and len(cleared) == len(set(cleared))
    assert str(line).startswith("console=ttyS0 nokaslr clearcpuid=514,151,")   # where theirs was
    assert f"clearcpuid={line.get('clearcpuid')}" in added


def test_pvm_args_on_an_empty_line():
    line = Cmdline("")
    assert pvm.add_pvm_args(line) == pvm.pvm_kernel_args()
    assert str(line) == " ".join(pvm.pvm_kernel_args())


def test_a_clearcpuid_too_long_for_the_kernel_is_refused():
    """Linux 6.1 copies clearcpuid= into a 128-byte buffer: a longer list would be cut silently."""
    users = ",".join(str(n) for n in range(400, 440))
    with pytest.raises(ValueError, match="at most 127.*--no-pvm-workarounds"):
        pvm.merge_clearcpuid(users)
    assert len(pvm.merge_clearcpuid("")) <= pvm.host.CLEARCPUID_MAX


# ---------------------------------------------------------------------------------------------
# Decoding and operand addresses
# ---------------------------------------------------------------------------------------------


def regs_with(**kw):
    regs = {name: 0 for name in pvm.GPRS}
    regs.update(rip=0x1000, rflags=0x2, cr0=0x80050033, cr4=0x620, cpl=0,
                cs_base=0, ds_base=0, es_base=0, ss_base=0, fs_base=0, gs_base=0, mxcsr=0x1f80)
    regs.update(kw)
    return regs


def insn(hexbytes, rip=0x1000, bitness=64):
    i = decode(bytes.fromhex(hexbytes.replace(" ", "")), rip, bitness)
    assert i is not None, hexbytes
    return i


@pytest.mark.parametrize("code, text", [
    ("cc", "int3"), ("9b", "fwait"), ("0f01ca", "clac"), ("0f01cb", "stac"),
    ("0fae15f0ffffff", "ldmxcsr [0FF7h]"), ("0fae1b", "stmxcsr [rbx]"),
    ("c5f8ae13", "vldmxcsr [rbx]"), ("c5f8ae1b", "vstmxcsr [rbx]"),
    ("f3480fb8c8", "popcnt rcx,rax"), ("66f30fb8c0", "popcnt ax,ax"),
])
def test_decode(code, text):
    i = insn(code)
    assert pvm.format_instruction(i) == text
    assert i.len == len(code) // 2
    assert i.mnemonic in pvm.SUPPORTED


def test_decode_rejects_garbage_and_truncation():
    assert decode(b"\x0f\xff", 0, 64) is None
    assert decode(b"\x0f\xae", 0, 64) is None           # ldmxcsr cut short
    assert decode(b"\xf3\x0f\xb8", 0, 64) is None


def test_rip_relative_is_from_the_next_instruction():
    i = insn("0fae15 10000000", rip=0xffffffff81000000)  # ldmxcsr [rip+0x10], 7 bytes
    assert effective_address(i, regs_with()) == 0xffffffff81000000 + 7 + 0x10
    i = insn("0fae15 f0ffffff", rip=0x1000)              # negative displacement
    assert effective_address(i, regs_with()) == 0x1000 + 7 - 0x10


def test_sib_addressing():
    i = insn("0fae5c8810")                                # stmxcsr [rax+rcx*4+0x10]
    assert effective_address(i, regs_with(rax=0x2000, rcx=3)) == 0x2000 + 12 + 0x10
    i = insn("0fae1c25 00002000")                         # [disp32], no base, no index
    assert effective_address(i, regs_with()) == 0x200000
    i = insn("420fae5cfd f8")                             # [rbp+r15*8-8]
    assert pvm.format_instruction(i) == "stmxcsr [rbp+r15*8-8]"
    assert effective_address(i, regs_with(rbp=0x5000, r15=2)) == 0x5000 + 16 - 8
    i = insn("0fae1424")                                  # [rsp]: SIB with no index
    assert effective_address(i, regs_with(rsp=0x8ff0)) == 0x8ff0


def test_address_arithmetic_wraps_at_the_address_size():
    i = insn("0fae58 f0")                                 # [rax-0x10]
    assert effective_address(i, regs_with(rax=8)) == (8 - 0x10) % 2**64
    i = insn("670fae58 f0")                               # [eax-0x10]: 32-bit addressing
    assert effective_address(i, regs_with(rax=0xffffffff00000008)) == (8 - 0x10) % 2**32
    i = insn("0fae1e 3412", bitness=16)                   # stmxcsr [0x1234], 16-bit
    assert effective_address(i, regs_with()) == 0x1234
    i = insn("0fae5f 10", bitness=16)                     # [bx+0x10] in 16-bit addressing
    assert effective_address(i, regs_with(rbx=0xfff8)) == 0x0008


def test_segment_bases():
    r = regs_with(rax=0x10, fs_base=0x7000_0000, gs_base=0xffff8880_0000_0000, ds_base=0x123000)
    assert linear_address(insn("650fae18"), r, 64) == 0xffff8880_0000_0010   # gs:[rax]
    assert linear_address(insn("640fae18"), r, 64) == 0x7000_0010            # fs:[rax]
    assert linear_address(insn("0fae18"), r, 64) == 0x10       # 64-bit mode ignores DS's base
    assert linear_address(insn("0fae18", bitness=32), r, 32) == 0x123010
    r32 = regs_with(rax=0x10, ss_base=0x40000, rbp=0x100)
    assert linear_address(insn("0fae5d 00", bitness=32), r32, 32) == 0x40100  # [ebp]: SS


# ---------------------------------------------------------------------------------------------
# popcnt and the other completions
# ---------------------------------------------------------------------------------------------

ARITH = OF | SF | ZF | AF | CF | PF


@given(st.integers(0, 2**64 - 1), st.sampled_from([16, 32, 64]), st.integers(0, 2**22 - 1))
def test_popcnt_matches_bit_count(value, bits, rflags):
    result, flags = popcnt(value, bits, rflags)
    src = value & (2**bits - 1)
    assert result == src.bit_count()
    assert flags & ZF == (ZF if src == 0 else 0)
    assert flags & (ARITH & ~ZF) == 0
    assert flags & ~ARITH == rflags & ~ARITH       # the other flags are untouched


REG64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]


def encode_popcnt_rr(dest, src, bits):
    """F3 [66] [REX] 0F B8 /r with mod=11."""
    rex = 0x40 | (8 if bits == 64 else 0) | (4 if dest >= 8 else 0) | (1 if src >= 8 else 0)
    code = b"\xf3" if bits != 16 else b"\x66\xf3"
    if rex != 0x40:
        code += bytes([rex])
    return code + b"\x0f\xb8" + bytes([0xc0 | (dest & 7) << 3 | (src & 7)])


@settings(max_examples=300)
@given(st.integers(0, 15), st.integers(0, 15), st.sampled_from([16, 32, 64]),
       st.lists(st.integers(0, 2**64 - 1), min_size=16, max_size=16), st.integers(0, 0xfff))
def test_popcnt_register_forms(dest, src, bits, values, flags):
    regs = regs_with(**dict(zip(REG64, values)), rflags=flags | 2)
    i = decode(encode_popcnt_rr(dest, src, bits), 0x1000, 64)
    done = complete_instruction(i, regs, 64, None)
    srcval = values[src] & (2**bits - 1)
    old = values[dest]
    expect = {16: (old & ~0xffff) | srcval.bit_count(), 32: srcval.bit_count(),
              64: srcval.bit_count()}[bits]
    assert done.regs == {REG64[dest]: expect}
    assert done.rip == 0x1000 + i.len
    assert done.rflags & ARITH == (ZF if srcval == 0 else 0)
    assert done.mnemonic == "popcnt" and done.exception is None


@given(st.integers(0, 2**64 - 1))
def test_popcnt_memory_source(value):
    mem = {0x2024: value.to_bytes(8, "little")}
    reads = []

    def read(lin, n):
        reads.append((lin, n))
        return mem[lin][:n]

    i = insn("f30fb874bb20")                         # popcnt esi, [rbx+rdi*4+0x20]
    done = complete_instruction(i, regs_with(rbx=0x2000, rdi=1, rsi=2**64 - 1), 64, read)
    assert reads == [(0x2024, 4)]
    assert done.regs == {"rsi": (value & 0xffffffff).bit_count()}   # 32-bit write zero-extends
    i = insn("f3480fb80d 00100000", rip=0x1000)      # popcnt rcx, [rip+0x1000]: 0x2009 + ...
    mem[0x1000 + 9 + 0x1000] = value.to_bytes(8, "little")
    done = complete_instruction(i, regs_with(), 64, read)
    assert done.regs == {"rcx": value.bit_count()}


def test_popcnt_memory_fault_becomes_page_fault():
    def read(lin, n):
        raise PageFault(lin, False)
    done = complete_instruction(insn("f30fb803"), regs_with(rbx=0xdead000), 64, read)
    assert done.exception == (pvm.PF_, 0) and done.cr2 == 0xdead000 and done.rip == 0x1000
    assert done.counter_key == "popcnt #PF"


def test_int3_fwait_clac_stac():
    r = regs_with(rflags=0x2 | AC)
    done = complete_instruction(insn("cc"), r, 64, None)
    assert (done.rip, done.exception, done.counter_key) == (0x1001, (3, None), "int3")
    done = complete_instruction(insn("9b"), r, 64, None)
    assert (done.rip, done.exception, done.rflags, done.mnemonic) == (0x1001, None, None, "fwait")
    assert complete_instruction(insn("0f01ca"), r, 64, None).rflags == 0x2
    assert complete_instruction(insn("0f01cb"), regs_with(), 64, None).rflags == 0x2 | AC
    assert complete_instruction(insn("0f01cb"), r, 64, None).rip == 0x1003


def test_fwait_with_ts_and_mp_raises_nm():
    done = complete_instruction(insn("9b"), regs_with(cr0=0x8000000b), 64, None)
    assert done.exception == (pvm.NM, None) and done.rip == 0x1000


def test_ldmxcsr_reads_memory():
    mem = {0x10000e + 0x10: struct.pack("<I", 0x9fc0)}
    i = insn("0fae15 10000000", rip=0x100007)
    done = complete_instruction(i, regs_with(rip=0x100007), 64, lambda lin, n: mem[lin][:n])
    assert (done.mxcsr, done.rip, done.store) == (0x9fc0, 0x10000e, None)


def test_stmxcsr_stores():
    done = complete_instruction(insn("650fae5c8810"), regs_with(rax=0x100, rcx=1, gs_base=0x70000,
                                                               mxcsr=0x1f80), 64, None)
    assert done.store == (0x70000 + 0x100 + 4 + 0x10, b"\x80\x1f\x00\x00")
    assert done.rip == 0x1006 and done.mxcsr is None


def test_vex_forms():
    mem = {0x3000: struct.pack("<I", 0x1fc0)}
    r = regs_with(rbx=0x3000, cr4=0x620 | pvm.CR4_OSXSAVE)
    assert complete_instruction(insn("c5f8ae13"), r, 64, lambda l, n: mem[l]).mxcsr == 0x1fc0
    assert complete_instruction(insn("c5f8ae1b"), r, 64, None).store == (0x3000, b"\x80\x1f\0\0")
    # without CR4.OSXSAVE a VEX instruction is #UD
    assert complete_instruction(insn("c5f8ae13"), regs_with(rbx=0x3000), 64, None).exception == (6, None)


@pytest.mark.parametrize("kw, vector, code", [
    (dict(cr4=0x20), pvm.UD, None),                 # CR4.OSFXSR clear
    (dict(cr0=0x80050037), pvm.UD, None),           # CR0.EM
    (dict(cr0=0x8005003b), pvm.NM, None),           # CR0.TS
])
def test_mxcsr_instructions_fault_like_the_cpu(kw, vector, code):
    for code_hex in ("0fae13", "0fae1b"):
        done = complete_instruction(insn(code_hex), regs_with(rbx=0x3000, **kw), 64,
                                    lambda l, n: b"\0\0\0\0")
        assert done.exception == (vector, code) and done.rip == 0x1000


def test_ldmxcsr_reserved_bits_gp():
    done = complete_instruction(insn("0fae13"), regs_with(rbx=0x3000), 64,
                                lambda l, n: struct.pack("<I", 0x10000))
    assert done.exception == (pvm.GP, 0) and done.mxcsr is None
    assert done.counter_key == "ldmxcsr #GP"


def test_unsupported_instruction():
    assert complete_instruction(insn("0f01c1"), regs_with(), 64, None) is None   # vmcall
    assert complete_instruction(insn("0fae2f"), regs_with(), 64, None) is None   # xrstor [rdi]


def test_exit_instruction_bytes():
    """KVM puts the bytes it fetched in the exit (flag bit 0, then size + 15 bytes). The data is
    what this host's KVM-PVM returned for `ldmxcsr [0x200000]; hlt`."""
    e = gaps._exit_insn_bytes(type("X", (), {"data": (1, 2305843168474435343, 62464, 4096, 0)}))
    assert e == bytes.fromhex("0fae1425000020 00f4 000000000000")
    assert gaps._exit_insn_bytes(type("X", (), {"data": (0, 0, 0)})) == b""


def test_pages_split_at_boundaries():
    assert list(gaps._pages(0x1ffa, 15)) == [(0x1ffa, 6), (0x2000, 9)]
    assert list(gaps._pages(0x1000, 4)) == [(0x1000, 4)]


REX_REGS = list(range(16))


@settings(max_examples=300)
@given(st.sampled_from(REX_REGS), st.sampled_from([i for i in REX_REGS if i != 4]),
       st.sampled_from([1, 2, 4, 8]), st.integers(-2**31, 2**31 - 1),
       st.lists(st.integers(0, 2**64 - 1), min_size=16, max_size=16))
def test_sib_addressing_matches_the_formula(base, index, scale, disp, values):
    """stmxcsr [base + index*scale + disp32] with every base/index register (REX.B/REX.X)."""
    rex = 0x40 | (2 if index >= 8 else 0) | (1 if base >= 8 else 0)
    sib = {1: 0, 2: 1, 4: 2, 8: 3}[scale] << 6 | (index & 7) << 3 | (base & 7)
    code = (bytes([rex]) if rex != 0x40 else b"") + bytes([0x0f, 0xae, 0x9c, sib]) \
        + struct.pack("<i", disp)
    i = decode(code, 0x1000, 64)
    regs = regs_with(**dict(zip(REG64, values)))
    expect = (values[base] + values[index] * scale + disp) % 2**64
    assert effective_address(i, regs) == expect
    assert linear_address(i, regs, 64) == expect


class FakeVcpu:
    """translate() over a page map {linear page: physical page}, like KVM_TRANSLATE."""

    def __init__(self, pages):
        self.pages = pages

    def translate(self, linear):
        phys = self.pages.get(linear & ~0xfff)
        return None if phys is None else phys | (linear & 0xfff)


def test_fetch_and_access_across_a_page_boundary():
    """Consecutive linear pages need not be consecutive in guest-physical memory: each page is
    translated on its own."""
    from pykvm.memory import GuestMemory
    mem = GuestMemory.for_test(0x10000)
    vcpu = FakeVcpu({0x7000_0000: 0x5000, 0x7000_1000: 0x2000})
    code = bytes.fromhex("f3480fb80d 00100000")         # popcnt rcx, [rip+0x1000], 9 bytes
    mem.write(0x5ffc, code[:4])
    mem.write(0x2000, code[4:])
    regs = regs_with(rip=0x7000_0ffc)
    got = gaps._fetch(vcpu, mem, regs, 64, None)
    assert got[:9] == code and len(got) == pvm.MAX_INSN
    # a data access that straddles the same boundary
    mem.write(0x5ffe, b"\x11\x22")
    mem.write(0x2000, b"\x33\x44")
    assert pvm.read_linear(vcpu, mem, 0x7000_0ffe, 4) == b"\x11\x22\x33\x44"
    pvm.write_linear(vcpu, mem, 0x7000_0ffe, b"abcd")
    assert mem.read(0x5ffe, 2) == b"ab" and mem.read(0x2000, 2) == b"cd"
    # the second page unmapped: the access faults before anything is written
    vcpu.pages.pop(0x7000_1000)
    with pytest.raises(PageFault) as e:
        pvm.write_linear(vcpu, mem, 0x7000_0ffe, b"wxyz")
    assert e.value.linear == 0x7000_1000 and e.value.write
    assert mem.read(0x5ffe, 2) == b"ab"
    # fetch stops at the unmapped page; with nothing readable it falls back to the exit's bytes
    assert gaps._fetch(vcpu, mem, regs, 64, None) == b"\xf3\x48ab"   # (the data test's bytes)
    exit = type("X", (), {"data": (1, 0x90c3 << 8 | 2, 0)})
    assert gaps._fetch(FakeVcpu({}), mem, regs, 64, exit) == b"\xc3\x90"


def test_describe_other_internal_errors():
    from pykvm.kvm import exits as E
    from pykvm.kvm._lib import lib
    e = E.InternalError(lib.KVM_INTERNAL_ERROR_DELIVERY_EV, (0x80000b0e, 0x1))
    assert pvm.describe_gap(None, e) == (f"KVM internal error, suberror "
                                         f"{lib.KVM_INTERNAL_ERROR_DELIVERY_EV}, data 0x80000b0e 0x1")
    assert pvm.complete_gap(None, e) is False


# ---------------------------------------------------------------------------------------------
# On /dev/kvm: tiny 64-bit CPL0 guests
# ---------------------------------------------------------------------------------------------

CODE = 0x100000
DATA = 0x200000
IDT = 0x3000
GDT = 0x4000
USER_STACK = 0x7000
MXCSR_IN = CODE + 0x800      # the ldmxcsr source, in the code page
NEW_MXCSR = 0x9fc0           # FZ, all exceptions masked, DAZ


def _kvm_or_skip():
    reason = kvm_unusable_reason()
    if reason:
        pytest.skip(reason)
    return host_kind()


class PortLog:
    def __init__(self, on_write=None):
        self.data = bytearray()
        self.on_write = on_write

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.data.append(value & 0xff)
        if self.on_write:
            self.on_write(value)


def _machine(code: bytes, *, idt: dict[int, int] | None = None):
    """A 64-bit CPL0 guest at CODE; port 0xe9 logs bytes, a write to port 0xf4 stops the machine
    (reason "exit"). The GDT adds CPL3 segments (data 0x23, code 0x2b) for `_TO_CPL3`."""
    from pykvm.machine import Machine, Stop
    from pykvm.x86 import cpu, paging
    m = Machine(memory=8 << 20, irqchip="none")
    cr3 = paging.write_identity_map(m.mem, user=True)
    m.mem.write(CODE, code)
    cpu.setup_long_mode(m.vcpu, m.mem, entry=CODE, cr3=cr3)
    gdt = cpu.BOOT_GDT + [cpu.gdt_entry(0xc0f3, 0, 0xfffff),    # 0x20: DPL3 data
                          cpu.gdt_entry(0xa0fb, 0, 0xfffff)]    # 0x28: DPL3 64-bit code
    m.mem.write(GDT, b"".join(struct.pack("<Q", e) for e in gdt))
    s = m.vcpu.get_sregs()
    s.gdt.base, s.gdt.limit = GDT, 8 * len(gdt) - 1
    s.cr4 |= cpu.CR4_OSFXSR | cpu.CR4_OSXMMEXCPT      # what an OS does before using SSE
    if idt:
        for vector, handler in idt.items():            # 64-bit interrupt gates, SDM Vol. 3A 6.14.1
            gate = struct.pack("<HHBBHII", handler & 0xffff, cpu.SEL_CODE64, 0, 0x8e,
                               (handler >> 16) & 0xffff, handler >> 32, 0)
            m.mem.write(IDT + 16 * vector, gate)
        s.idt.base, s.idt.limit = IDT, 16 * 32 - 1
    m.vcpu.set_sregs(s)
    log = PortLog()
    m.add_pio(0xe9, 1, log)
    m.add_pio(0xf4, 1, PortLog(lambda v: m.request_stop(Stop("exit", v))))
    m.internal_error_handlers.append(pvm.complete_gap)
    return m, log


def _asm(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


def _to_cpl3(entry: int) -> str:
    """iretq to `entry` at CPL3 with IOPL=3 (so `out` works there): push SS, RSP, RFLAGS, CS, RIP."""
    return (f"6a23 68{struct.pack('<I', USER_STACK).hex()} 6802300000 6a2b "
            f"68{struct.pack('<I', entry).hex()} 48cf")


def _gap_program() -> bytes:
    ldmxcsr_next = CODE + 7 + 7
    kernel = _asm(
        "48c7c3 00002000",                                   # mov rbx, DATA
        "0fae15", struct.pack("<i", MXCSR_IN - ldmxcsr_next).hex(),   # ldmxcsr [rip+x]
        "0fae1b",                                            # stmxcsr [rbx]
        "48b8 01000000 00f0f0f0",                            # mov rax, 0xf0f0f00000000001
        "31d2 f9",                                           # xor edx,edx (ZF=PF=1); stc
        "f3480fb8c8",                                        # popcnt rcx, rax
        "9c 8f4308",                                         # pushfq; pop [rbx+8]
        "48894b10",                                          # mov [rbx+0x10], rcx
        "48c7c6 ffffffff",                                   # mov rsi, -1
        "bf 01000000",                                       # mov edi, 1
        "f30fb874bb20",                                      # popcnt esi, [rbx+rdi*4+0x20]
        "48897318",                                          # mov [rbx+0x18], rsi
        "b8 0000ffff 31d2 f9",                               # mov eax, 0xffff0000; xor edx,edx; stc
        "66f30fb8c0",                                        # popcnt ax, ax
        "9c 8f4328",                                         # pushfq; pop [rbx+0x28]
        "48894340",                                          # mov [rbx+0x40], rax
        "0f01cb 9c 8f4330",                                  # stac; pushfq; pop [rbx+0x30]
        "0f01ca 9c 8f4338",                                  # clac; pushfq; pop [rbx+0x38]
        "9b",                                                # fwait
        _to_cpl3(CODE + 0x100),
    )
    return kernel + bytes(0x100 - len(kernel)) + _asm(
        # At CPL3 the CPU runs natively: its stmxcsr shows the MXCSR the vCPU really has.
        "0fae1c25 48002000",                                 # stmxcsr [DATA+0x48]
        "b0aa e6e9 e6f4",                                    # mov al, 0xaa; out 0xe9; out 0xf4
    )


def test_gap_program_disassembles_as_intended():
    code = _gap_program()
    text = [pvm.format_instruction(i) for i in iced.Decoder(64, code, ip=CODE)]
    assert text[1] == f"ldmxcsr [{MXCSR_IN:X}h]"
    assert "popcnt esi,[rbx+rdi*4+20h]" in text and "popcnt ax,ax" in text
    assert text[text.index("fwait") + 6] == "iretq"
    assert text[-4:] == ["stmxcsr [200048h]", "mov al,0AAh", "out 0E9h,al", "out 0F4h,al"]


def test_gaps_completed_on_kvm():
    kind = _kvm_or_skip()
    m, log = _machine(_gap_program())
    with m:
        m.mem.write_int(MXCSR_IN, 4, NEW_MXCSR)
        m.mem.write_int(DATA + 0x24, 4, 0xdeadbeef)
        stop = m.run(timeout=60)
        assert stop.reason == "exit", stop
        assert bytes(log.data) == b"\xaa"
        q = lambda off: m.mem.read_int(DATA + off, 8)
        assert m.mem.read_int(DATA, 4) == NEW_MXCSR                       # stmxcsr
        assert q(0x10) == 13                                              # popcnt rcx, rax
        assert q(0x08) & (ARITH | 1) == 0                                 # ZF CF PF cleared
        assert q(0x18) == 24                                              # popcnt esi, m32
        assert q(0x40) == 0xffff0000                                      # ax = 0, rest kept
        assert q(0x28) & ARITH == ZF
        assert q(0x30) & AC and not q(0x38) & AC                         # stac, clac
        assert m.mem.read_int(DATA + 0x48, 4) == NEW_MXCSR    # native stmxcsr at CPL3
        gaps = dict(m.stats.pvm_gaps)
    if kind != pvm.KVM_PVM:
        pytest.skip(f"host is {kind}: the instructions ran natively (results checked), "
                    "no gaps to count")
    assert gaps == {"ldmxcsr": 1, "stmxcsr": 1, "popcnt": 3, "stac": 1, "clac": 1, "fwait": 1}


def _int3_program():
    # main at CODE: int3; mov al, 0xee; out 0xe9, al; hlt   (never reached: the handler halts)
    # #BP handler at CODE+0x100: mov al, 0xbb; out 0xe9, al; mov rax, [rsp]; mov [DATA], rax; hlt
    main = _asm("cc b0ee e6e9 f4")
    handler = _asm("b0bb e6e9 488b0424 48890425 00002000 f4")
    return main + bytes(0x100 - len(main)) + handler


def test_int3_delivers_breakpoint_on_kvm():
    kind = _kvm_or_skip()
    m, log = _machine(_int3_program(), idt={3: CODE + 0x100})
    with m:
        stop = m.run(timeout=30)
        assert stop.reason == "halt", stop
        assert bytes(log.data) == b"\xbb"
        assert m.mem.read_int(DATA, 8) == CODE + 1       # #BP is a trap: saved RIP after int3
        gaps = dict(m.stats.pvm_gaps)
    if kind != pvm.KVM_PVM:
        pytest.skip(f"host is {kind}: int3 ran natively (handler checked), no gap to count")
    assert gaps == {"int3": 1}


def test_stmxcsr_to_unmapped_page_raises_page_fault_on_kvm():
    kind = _kvm_or_skip()
    if kind != pvm.KVM_PVM:
        pytest.skip(f"host is {kind}: the fault would come from the CPU, not from pykvm")
    # mov rbx, 0x300000000 (beyond the 4 GiB identity map); stmxcsr [rbx]; hlt
    # #PF handler at CODE+0x100: mov al, 0xpf; out; store CR2 and the error code; hlt
    main = _asm("48bb 00000000 03000000 0fae1b f4")
    handler = _asm("b00e e6e9 0f20d0 48890425 00002000 488b0424 48890425 08002000 f4")
    m, log = _machine(main + bytes(0x100 - len(main)) + handler, idt={14: CODE + 0x100})
    with m:
        stop = m.run(timeout=30)
        assert stop.reason == "halt", stop
        assert bytes(log.data) == b"\x0e"
        assert m.mem.read_int(DATA, 8) == 0x300000000         # CR2
        assert m.mem.read_int(DATA + 8, 8) == 2               # error code: not present, write
        assert dict(m.stats.pvm_gaps) == {"stmxcsr #PF": 1}


def test_unsupported_gap_is_described_on_kvm():
    kind = _kvm_or_skip()
    if kind != pvm.KVM_PVM:
        pytest.skip(f"host is {kind}: xrstor is not an emulation gap there")
    # xrstor [rbx] at CPL0: KVM-PVM's emulator has no entry for it; we don't complete it
    m, log = _machine(_asm("48c7c3 00002000 0fae2b f4"))
    with m:
        stop = m.run(timeout=30)
        assert stop.reason == "error"
        e = m.vcpu.run()        # the same exit again: RIP did not move
        line = pvm.describe_gap(m, e)
        assert line == (f"KVM could not emulate the instruction at RIP {CODE + 7:#x} (64-bit, CPL0): "
                        "0f ae 2b = xrstor [rbx]"), line
        assert dict(m.stats.pvm_gaps) == {"retried": 1}   # run once more, then reported


def test_code_rewritten_after_kvm_failed_runs_again_on_kvm():
    """Another vCPU finishing a text_poke_bp between KVM's failed emulation of its int3 and our
    read of RIP: the new instruction runs, no #BP is injected (the guest would die of "int3")."""
    kind = _kvm_or_skip()
    if kind != pvm.KVM_PVM:
        pytest.skip(f"host is {kind}: int3 is not an emulation gap there")
    # int3 over the first byte of a 2-byte jump label (its tail, 90, already written); then
    # mov al, 0xaa; out 0xe9, al; out 0xf4, al. No IDT: a #BP would end in a triple fault.
    m, log = _machine(_asm("cc90 b0aa e6e9 e6f4"))

    def other_vcpu_finishes_the_poke(machine, exit):
        machine.mem.write(CODE, b"\x66")              # the new first byte: 66 90, a 2-byte nop
        return False

    m.internal_error_handlers.insert(0, other_vcpu_finishes_the_poke)
    with m:
        stop = m.run(timeout=30)
        assert stop.reason == "exit", stop
        assert bytes(log.data) == b"\xaa"
        assert dict(m.stats.pvm_gaps) == {"retried": 1}


@pytest.mark.parametrize("nr", [9, 0x1234])   # KVM_HC_CLOCK_PAIRING, and a number KVM doesn't know
def test_stuck_vmcall_completed_after_kicks_on_kvm(nr):
    """On KVM-PVM a CPL0 vmcall neither completes nor exits (any hypercall number): only a kick
    gets KVM_RUN back, with RIP still on the vmcall. StuckVmcall completes it on the second look."""
    import threading
    from pykvm.kvm import exits as E
    from pykvm.kvm.headers import KVM_ENOSYS
    from pykvm.machine import handle_exit
    kind = _kvm_or_skip()
    if kind != pvm.KVM_PVM:
        pytest.skip(f"host is {kind}: vmcall exits to KVM's hypercall handler there")
    # mov eax, nr; vmcall; out 0xe9, al; out 0xf4, al
    m, log = _machine(_asm("b8", struct.pack("<I", nr).hex(), "0f01c1 e6e9 e6f4"))
    watch = pvm.StuckVmcall()
    m.vcpu.thread_id = threading.get_ident()
    done = threading.Event()

    def kicker():
        while not done.wait(0.1):
            m.vcpu.kick()

    threading.Thread(target=kicker, daemon=True).start()
    interrupted = 0
    try:
        with m:
            while True:
                e = m.vcpu.run()
                if isinstance(e, E.Interrupted):
                    interrupted += 1
                    assert interrupted < 50, "the vmcall was never completed"
                    watch.check(m)
                    continue
                if isinstance(e, E.IoOut) and e.port == 0xf4:
                    break
                assert handle_exit(m, e) is None, e
            assert bytes(log.data) == bytes([-KVM_ENOSYS & 0xff])   # al after the vmcall
            assert m.vcpu.get_regs().rax == 2**64 - KVM_ENOSYS
            assert dict(m.stats.pvm_gaps) == {"vmcall": 1}
            assert interrupted >= 2
    finally:
        done.set()


def test_lazy_stuck_vmcall_looks_at_most_every_min_interval_per_vcpu():
    """Kicks other than the watchdog's (the user irqchip's PIT deadline, 100 a second; the
    profiler) must not each pay for a register read, code fetch and decode: LinuxVM's checker
    looks at a vCPU at most every MIN_INTERVAL seconds."""
    from types import SimpleNamespace
    now = [0.0]
    lazy = pvm.LazyStuckVmcall(clock=lambda: now[0])
    looked = []
    lazy._impl = SimpleNamespace(check=lambda m: looked.append((m.vcpu.index, now[0])) or False)
    cpu0 = SimpleNamespace(vcpu=SimpleNamespace(index=0))
    cpu1 = SimpleNamespace(vcpu=SimpleNamespace(index=1))
    step = lazy.MIN_INTERVAL / 4
    for _ in range(12):                 # 3 x MIN_INTERVAL of kicks on vCPU 0, 4 per interval
        lazy.check(cpu0)
        now[0] += step
    lazy.check(cpu1)                    # another vCPU has its own record
    assert [t for i, t in looked if i == 0] == [0.0, 4 * step, 8 * step]
    assert [i for i, _ in looked].count(1) == 1
