"""Build, load and run the freestanding guest programs in `firmware/`.

    build("hello")                -> Path of the ELF, compiled on first use into the cache
    load_elf(mem, path)           -> entry address, after copying PT_LOAD segments into guest RAM
    run_firmware("hello")         -> FirmwareResult(status=0, output=b"Hello ...", stop=..., ...)

A firmware program is one C or assembly file, `firmware/<name>.c` or `firmware/<name>.S`, linked
with the runtime in `firmware/runtime/` (see `firmware/runtime/fw.h`): it starts in 16-bit real
mode at 0:0x8000, switches itself to long mode, and runs `main()` at CPL3 (the default: a KVM-PVM
host runs CPL3 guest code natively, CPL0 code in an emulator) or at CPL0. It prints through the
debug console (port 0xE9) and ends by writing its exit status to port 0xF4.

Nothing is committed in binary form: `build` runs the machine's gcc and ld on the sources and keeps
the result in `$PYKVM_CACHE/firmware/<hash>/` (default `~/.cache/pykvm`), the hash covering every
source file, the flags and the compiler's version, so an edit or a new compiler rebuilds.

The args block: before the first instruction the VMM writes, at guest-physical ARGS_ADDR (0x5000),
little-endian (the same layout is `struct fw_args` in firmware/runtime/fw.h):

    +0   u32 magic    ARGS_MAGIC (0x41464b50, "PKFA"); without it the runtime uses defaults
    +4   u32 flags    bit 0 ARGS_FLAG_CPL0: run main() at CPL0 (default CPL3 with IOPL=3)
    +8   u32 nargs    number of valid entries in arg[] (at most ARGS_MAX = 14)
    +12  u32 reserved 0
    +16  u64 arg[14]  integer parameters; each program documents its own
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from ..record import Record

# Building (hashlib, subprocess, tempfile, the asset cache) imports what it needs when it runs:
# loading and running an already-built program is on the start-up path that bench/startup.py times.

REPO = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = REPO / "firmware"
RUNTIME_DIR = FIRMWARE_DIR / "runtime"

# The args block (firmware/runtime/fw.h, struct fw_args).
ARGS_ADDR = 0x5000
ARGS_MAGIC = 0x41464B50
ARGS_FLAG_CPL0 = 1 << 0
ARGS_MAX = 14
_ARGS_HEADER = struct.Struct("<IIII")
ARGS_SIZE = _ARGS_HEADER.size + 8 * ARGS_MAX   # 128

# Exit statuses the runtime itself produces (a program's own statuses stay below 0x1000).
STATUS_EXCEPTION = 0x1000    # | vector: an unexpected CPU exception
STATUS_BOOT = 0x2000         # | stage: a mode-switch self-check failed
BOOT_STAGES = {1: "real mode", 2: "protected mode", 3: "paging", 4: "long mode", 5: "CPL3"}

# Real-mode entry: the runtime's .boot16 section; the stack below it.
REAL_MODE_STACK = 0x7FF0

# The mode-switch assist (fw.h FW_PORT_ASSIST): a 32-bit write of ASSIST_LONG_MODE asks the VMM
# to do what KVM-PVM refuses to let the guest do itself - set EFER.LME/LMA and CR0.PG.
PORT_ASSIST = 0xF8
ASSIST_LONG_MODE = 1

CFLAGS = [
    "-m64", "-std=gnu11", "-O2", "-g", "-Wall", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
    # No SSE/MMX/x87 in generated code: CPL0 code runs in KVM-PVM's emulator, which lacks some of
    # it, and the runtime never enables SSE (CR4.OSFXSR) anyway. No red zone: exceptions at CPL0
    # push onto the current stack.
    "-mno-sse", "-mno-mmx", "-mno-80387", "-mgeneral-regs-only", "-mno-red-zone",
]
LDFLAGS = ["-nostdlib", "-static", "--no-warn-rwx-segments", "-z", "noexecstack"]
_BUILDER_VERSION = "1"


class FirmwareError(Exception):
    """A firmware program could not be built, loaded or started. The message is one line;
    `details` keeps a compiler's full output."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


# ---------------------------------------------------------------- building

def programs() -> list[str]:
    """Names of the firmware programs in firmware/."""
    return sorted(p.stem for p in FIRMWARE_DIR.iterdir()
                  if p.is_file() and p.suffix in (".c", ".S"))


def cache_root() -> Path:
    """The one cache root ($PYKVM_CACHE, ~/.cache/pykvm): pykvm.assets.cache's, imported on use."""
    from ..assets.cache import cache_root as root
    return root()


def _sources(name: str) -> list[Path]:
    found = [p for p in (FIRMWARE_DIR / f"{name}.c", FIRMWARE_DIR / f"{name}.S") if p.is_file()]
    if not found:
        raise FirmwareError(f"no firmware program {name!r} (firmware/{name}.c or .S); "
                            f"have: {', '.join(programs())}")
    runtime = sorted(p for p in RUNTIME_DIR.iterdir() if p.suffix in (".c", ".S"))
    return runtime + found


@functools.lru_cache(maxsize=None)
def _tool_version(tool: str) -> str:
    import subprocess
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise FirmwareError(f"{tool} not found: install gcc and binutils (Debian: build-essential)") \
            from None
    return out.splitlines()[0] if out else tool


def _key(name: str, sources: list[Path]) -> str:
    import hashlib
    h = hashlib.sha256()
    h.update(f"pykvm-firmware {_BUILDER_VERSION}\n{name}\n".encode())
    h.update(("\0".join(CFLAGS + LDFLAGS) + "\n").encode())
    h.update((_tool_version("gcc") + "\n" + _tool_version("ld") + "\n").encode())
    inputs = sources + sorted(p for p in RUNTIME_DIR.iterdir() if p.suffix in (".h", ".ld"))
    for p in inputs:
        h.update(f"{p.relative_to(FIRMWARE_DIR)}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:20]


def _run_tool(argv: list[str], what: str) -> None:
    import subprocess
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        output = (r.stderr + r.stdout).strip()
        first = next((ln for ln in output.splitlines() if "error" in ln.lower()),
                     output.splitlines()[0] if output else f"exit status {r.returncode}")
        raise FirmwareError(f"building {what} failed: {first.strip()}", output)


def build(name: str, *, cache: Path | None = None) -> Path:
    """Compile firmware/<name>.{c,S} with the runtime into an ELF; return its path.

    Cached by a hash of the inputs: the first call compiles (well under a second), later calls
    only hash the sources."""
    import tempfile
    sources = _sources(name)
    out_dir = (cache or cache_root()) / "firmware" / _key(name, sources)
    elf = out_dir / f"{name}.elf"
    if elf.is_file():
        return elf
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FirmwareError(f"cannot create {out_dir}: {e.strerror}; set PYKVM_CACHE to a "
                            "writable directory") from None
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        objs = []
        for src in sources:
            obj = Path(tmp) / f"{src.parent.name}-{src.name}.o"
            _run_tool(["gcc", *CFLAGS, "-I", str(RUNTIME_DIR), "-c", str(src), "-o", str(obj)],
                      f"{name} ({src.relative_to(REPO)})")
            objs.append(str(obj))
        linked = Path(tmp) / f"{name}.elf"
        _run_tool(["ld", *LDFLAGS, "-T", str(RUNTIME_DIR / "link.ld"), "-o", str(linked), *objs],
                  f"{name} (link)")
        os.replace(linked, elf)   # atomic: a concurrent build of the same inputs is harmless
    return elf


# ---------------------------------------------------------------- loading

def load_elf(mem, path: str | os.PathLike) -> int:
    """Copy an x86-64 ELF's PT_LOAD segments into guest memory at their physical addresses
    (p_paddr), zero-filling each segment's tail beyond its file contents (.bss). Returns the
    entry address. Raises FirmwareError, one line, for anything that is not a loadable x86-64 ELF
    or a segment outside guest RAM."""
    from ..elf import EM_X86_64, ET_EXEC, ElfFormatError, load_segments, read_elf64

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FirmwareError(f"{path}: cannot read: {e.strerror}") from None
    try:
        elf = read_elf64(data)
    except ElfFormatError as e:
        raise FirmwareError(f"{path}: {e}; firmware must be an x86-64 ELF executable") from None
    if elf.machine != EM_X86_64:
        raise FirmwareError(f"{path}: not an x86-64 ELF (machine {elf.machine_name}); "
                            "firmware must be built for x86-64")
    if elf.type != ET_EXEC:
        raise FirmwareError(f"{path}: ELF type {elf.type_name}, expected ET_EXEC "
                            "(a linked executable)")
    segments = elf.loads()
    if not segments:
        raise FirmwareError(f"{path}: no PT_LOAD segments")
    load_segments(mem, data, segments, lambda i, ph: FirmwareError(
        f"{path}: segment {i} at {ph.paddr:#x}..{ph.paddr + ph.memsz:#x} is outside guest RAM "
        f"({mem.size:#x} bytes)"))
    return elf.entry


def write_args(mem, *, cpl: int = 3, args: Iterable[int] = ()) -> None:
    """Write the args block at ARGS_ADDR (layout in the module docstring)."""
    if cpl not in (0, 3):
        raise FirmwareError(f"cpl must be 0 or 3, not {cpl!r}")
    args = [int(a) for a in args]
    if len(args) > ARGS_MAX:
        raise FirmwareError(f"at most {ARGS_MAX} firmware arguments, got {len(args)}")
    flags = ARGS_FLAG_CPL0 if cpl == 0 else 0
    block = _ARGS_HEADER.pack(ARGS_MAGIC, flags, len(args), 0)
    block += struct.pack(f"<{ARGS_MAX}Q", *(a & (2**64 - 1) for a in args),
                         *([0] * (ARGS_MAX - len(args))))
    mem.write(ARGS_ADDR, block)


def start_real_mode(vcpu, entry: int) -> None:
    """Point the vCPU at a real-mode entry (below 1 MiB) as CS:IP, stack below the runtime."""
    from ..x86.cpu import setup_real_mode
    if entry >= 0x100000:
        raise FirmwareError(f"entry {entry:#x} is not reachable in real mode (must be below 1 MiB)")
    setup_real_mode(vcpu, (entry >> 4) & 0xF000, entry & 0xFFFF, sp=REAL_MODE_STACK)


# ---------------------------------------------------------------- running

# One `name=N` field of a report line; a hex value (0x...) is not one (its "0" is not a whole word).
_FIELD = re.compile(r"\b(\w+)=(\d+)\b")


class FirmwareResult(Record):
    """How a firmware run ended.

    status: the value written to the exit port (None if the program never got there: see stop).
    output: everything written to the debug console.
    stop: the pykvm.stop.Stop the run ended with.
    exits: VM exits by reason, from the vCPU's counters ({"IO": 12, "HLT": 1}).
    seconds_in_run: inside KVM_RUN; wall_time: in Machine.run.
    unclaimed_pio: port accesses no device claimed.
    """

    __slots__ = ("status", "output", "stop", "exits", "seconds_in_run", "wall_time",
                 "unclaimed_pio")

    def __init__(self, status: int | None, output: bytes, stop: object,
                 exits: dict[str, int] | None = None, seconds_in_run: float = 0.0,
                 wall_time: float = 0.0, unclaimed_pio: int = 0) -> None:
        self.status = status
        self.output = output
        self.stop = stop
        self.exits = {} if exits is None else exits
        self.seconds_in_run = seconds_in_run
        self.wall_time = wall_time
        self.unclaimed_pio = unclaimed_pio

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def report(self, tag: str) -> dict[str, int] | None:
        """The `name=N` fields (decimal) after `tag` on the first output line holding it; None if
        no line does. Firmware reports numbers this way: firmware/virtio_blk.c prints
        "virtio_blk: bench bytes=N cycles=C ...", so report("virtio_blk: bench")["bytes"] is N."""
        for line in self.text.splitlines():
            if tag in line:
                rest = line.split(tag, 1)[1]
                return {name: int(value) for name, value in _FIELD.findall(rest)}
        return None

    @property
    def exception(self) -> int | None:
        """The CPU exception vector the runtime reported, if that is how the program ended."""
        if self.status is not None and self.status & ~0x1F == STATUS_EXCEPTION:
            return self.status & 0x1F
        return None

    @property
    def boot_failure(self) -> str | None:
        """The boot stage whose self-check failed, if that is how the program ended."""
        if self.status is not None and self.status & ~0xFF == STATUS_BOOT:
            return BOOT_STAGES.get(self.status & 0xFF, f"stage {self.status & 0xFF}")
        return None


class ModeSwitchAssist:
    """Port 0xF8: the firmware runtime's request for help with its switch into long mode.

    The runtime first tries the architectural way (wrmsr EFER.LME, mov to CR0.PG). A KVM-PVM host
    answers both with #GP: its MMU only shadows 4-level page tables, so a guest cannot turn paging
    on from protected mode. The runtime's #GP handler then writes ASSIST_LONG_MODE here and this
    device calls `enter_long_mode()`, which the VMM wires to `assist_long_mode(vcpu)`. `requests`
    counts the writes (a test can tell which way the guest went)."""

    def __init__(self, enter_long_mode: Callable[[], None]):
        self.enter_long_mode = enter_long_mode
        self.requests = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.requests += 1
        if value == ASSIST_LONG_MODE:
            self.enter_long_mode()


def assist_long_mode(vcpu) -> None:
    """Set EFER.LME|LMA and CR0.PG, keeping the guest's CR3/CR4 and segments: the effect of the
    guest's own wrmsr and mov to CR0 (SDM 9.8.5). The guest goes on in compatibility mode at the
    instruction after its `out` (KVM has already stepped past it) and far-jumps to 64-bit code."""
    from ..x86.cpu import CR0_PG, EFER_LMA, EFER_LME
    sregs = vcpu.get_sregs()
    sregs.efer |= EFER_LME | EFER_LMA
    sregs.cr0 |= CR0_PG
    vcpu.set_sregs(sregs)


def firmware_machine(memory: int = 16 << 20, **machine_kwargs):
    """A Machine with no interrupt controller, as firmware programs expect."""
    from ..machine import Machine
    machine_kwargs.setdefault("irqchip", "none")
    return Machine(memory, **machine_kwargs)


def prepare(machine, elf: str | os.PathLike, *, cpl: int = 3, args: Iterable[int] = ()) -> int:
    """Load `elf` into `machine`, write the args block, add the mode-switch assist (port 0xF8)
    and point the vCPU at the real-mode entry. Returns the entry. For callers that drive
    `machine.run()` themselves; they add the debug console and exit port."""
    entry = load_elf(machine.mem, elf)
    machine.add_pio(PORT_ASSIST, 4, ModeSwitchAssist(lambda: assist_long_mode(machine.vcpu)),
                    "fw-assist")
    write_args(machine.mem, cpl=cpl, args=args)
    start_real_mode(machine.vcpu, entry)
    return entry


def run_firmware(name: str, *, cpl: int = 3, args: Iterable[int] = (), timeout: float = 30,
                 memory: int = 16 << 20, setup: Callable | None = None,
                 echo: Callable[[bytes], None] | None = None,
                 complete_pvm_gaps: bool = False, irqchip: str = "none",
                 fast_path: bool = False, hugepages: bool = True) -> FirmwareResult:
    """Build `name`, boot it on a fresh Machine, run it to its exit, and report.

    setup(machine) is called before the first instruction, to add devices (e.g. a counter on the
    port exit_storm writes to); echo(bytes) also receives console output as it comes.
    complete_pvm_gaps registers pykvm.pvm.complete_gap, so CPL0 instructions KVM-PVM's emulator
    lacks (int3, popcnt, ...) are completed by the VMM; off by default, so a program meets the
    host as it is (the runtime itself avoids them). irqchip: the Machine's interrupt controller,
    "none" (the default: firmware that needs none), "user" (pykvm's Python 8259 pair and 8254,
    injected with KVM_INTERRUPT: firmware/timer.c) or "kernel" (needed by devices that drive an
    interrupt line, e.g. a virtio-mmio device from attach_mmio, even when the guest polls).
    fast_path: the Machine's C run loop (pykvm.kvm.fastpath), as LinuxVM's machines have it.
    hugepages: Machine(hugepages=...), how guest RAM is backed."""
    from ..devices.debugcon import DebugCon
    from ..stop import StopReason
    from ..x86 import layout

    elf = build(name)
    output = bytearray()

    def out(data: bytes) -> None:
        output.extend(data)
        if echo is not None:
            echo(data)

    with firmware_machine(memory, irqchip=irqchip, fast_path=fast_path,
                          hugepages=hugepages) as m:
        m.add_pio(layout.PORT_DEBUG, 1, DebugCon(out), "debugcon")
        m.add_exit_port()
        prepare(m, elf, cpl=cpl, args=args)
        if complete_pvm_gaps:
            from ..pvm import complete_gap
            m.internal_error_handlers.append(complete_gap)
        if setup is not None:
            setup(m)
        stop = m.run(timeout=timeout)
        return FirmwareResult(
            status=stop.status if stop.reason is StopReason.EXIT else None,
            output=bytes(output), stop=stop, exits=m.vcpu.exit_counts(),
            seconds_in_run=m.vcpu.seconds_in_run, wall_time=m.stats.wall_time,
            unclaimed_pio=m.pio.unclaimed)
