"""`Machine`: a VM, its RAM, its buses and devices, its vCPUs, and the run loop.

The run loop is the heart of any VMM:

    while not stopped:
        exit = vcpu.run()                  # KVM_RUN: the guest runs until it needs us
        outcome = handle_exit(machine, exit)

`handle_exit` (pykvm/dispatch.py) is a plain function over typed exits (pykvm.kvm.exits), so it can
be tested with made-up exits and no /dev/kvm; the loop below looks up the same table inline.

With several vCPUs (`Machine(cpus=N)`) each one runs that loop on its own thread: vCPU 0 (the
bootstrap processor) on the thread that calls run(), the others (application processors) on
threads run() starts. KVM_RUN is a call into C through cffi, which releases the GIL for the
duration (csrc/kvm_helpers.h), so the vCPUs run the guest in parallel and only take turns in
Python, to handle exits. The APs start in KVM_MP_STATE_UNINITIALIZED: their KVM_RUN waits in the
kernel until the guest's BSP sends INIT and a startup IPI through the in-kernel local APIC, which
then starts them at the SIPI vector in real mode - no VMM code is involved. Exits from several
vCPUs reach the same device models, so each model says how it stays consistent (a lock, or why it
needs none). `machine.vcpu` is the vCPU of the calling thread (vCPU 0 outside the run loops), so
exit handlers that read or write registers (pykvm.pvm, pykvm.halt) act on the right one.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable

from .bus import Bus
from .devices.debugcon import ExitPort
from .dispatch import _HANDLERS, _unknown, handle_exit  # noqa: F401  (handle_exit: public here too)
from .kvm.fastpath import FastPath
from .irq import IrqfdLine, IrqLine, KvmIrqLine
from .kvm import KICK_SIGNAL, Kvm, exits as E
from .memory import GuestMemory, MmapBackend, Region
from .runclock import RunClock, RunDeadline
from .stop import Stop, StopReason
from .workers import start_worker
from .x86 import layout


class MachineError(Exception):
    """A configuration mistake by the VMM's user (too little memory, ...); one line, for the CLI."""


def check_cpus(cpus, irqchip: str = "kernel") -> int:
    """A vCPU count the machine can have (KVM's own limit is checked when the VM exists)."""
    if isinstance(cpus, bool) or not isinstance(cpus, int):
        raise MachineError(f"vCPU count {cpus!r} is not a whole number")
    if cpus < 1:
        raise MachineError(f"vCPU count {cpus}: a machine needs at least one vCPU")
    if cpus > 1 and irqchip != "kernel":
        raise MachineError(f"{cpus} vCPUs need the in-kernel irqchip (its local APICs start and "
                           f"interrupt the other CPUs); irqchip {irqchip!r} runs one vCPU")
    return cpus


class Stats:
    """What the VMM counted. Exits by reason and time inside KVM_RUN are kept by the vCPU's C
    helper (Vcpu.exit_counts(), Vcpu.seconds_in_run); these are the rest."""

    def __init__(self) -> None:
        self.guest_errors: collections.Counter = collections.Counter()
        self.pvm_gaps: collections.Counter = collections.Counter()
        self.interrupts: collections.Counter = collections.Counter()  # vector -> count injected
                                                                       # by the VMM (irqchip="user")
        self.wall_time = 0.0                                           # wall seconds in the run loop
        self.seconds_halted = 0.0      # irqchip="user": hlt waits for an interrupt (dispatch._hlt)
        self.worker_errors: collections.Counter = collections.Counter()   # by thread name

    def __repr__(self) -> str:
        return "Stats(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"



_kick_handler_installed = False


def _install_kick_handler() -> bool:
    """A no-op handler for KICK_SIGNAL, so that signal only interrupts KVM_RUN (its default action
    would end the process). Python only lets the main thread install handlers."""
    global _kick_handler_installed
    if not _kick_handler_installed and threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda *_: None)
        _kick_handler_installed = True
    return _kick_handler_installed


def kick_handler_installed() -> bool:
    """Whether a KICK_SIGNAL sent to a vCPU thread only interrupts its KVM_RUN (see above)."""
    return _kick_handler_installed


class Machine:
    """An x86 machine with `cpus` vCPUs. Use as a context manager; `run()` blocks, `start()` runs
    in a thread.

    irqchip: "kernel" puts KVM's PIC/IOAPIC/LAPIC and PIT in the kernel (fast); "user" uses pykvm's
    Python i8259 pair and i8254 and injects their interrupts itself (slower, every step visible;
    one vCPU only: the Python PIC delivers to one CPU and there is no local APIC for the others);
    "none" leaves the vCPU with no interrupt controller at all (firmware tests).
    fast_path: run vCPU 0's loop in C (csrc/fastpath.h), answering hot port I/O (and the kicks of a
    virtio-blk disk bound to it, pykvm/virtio/blk_fast.py) without Python.
    ram: a factory (gpa, size) -> backend for each RAM region (default: anonymous memory).
    cpus: how many vCPUs (pykvm/machine.py's docstring: one thread each)."""

    def __init__(self, memory: int = 64 * layout.MiB, *, irqchip: str = "kernel",
                 kvm: Kvm | None = None, hugepages: bool = True, fast_path: bool = False,
                 ram: Callable[[int, int], object] | None = None, cpus: int = 1):
        if memory < 1 * layout.MiB or memory % 4096:
            raise MachineError(f"memory size {memory} is not a positive multiple of 4 KiB "
                               "(at least 1 MiB)")
        check_cpus(cpus, irqchip)
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        if cpus > (limit := self.kvm.max_vcpus):
            if self._own_kvm:
                self.kvm.close()
            raise MachineError(f"{cpus} vCPUs is more than this host's KVM allows "
                               f"({limit}, KVM_CAP_MAX_VCPUS)")
        self.vm = self.kvm.create_vm()
        self.irqchip = irqchip
        self.stats = Stats()
        # With several vCPUs, exits come from several threads: the device models take turns
        # behind one lock, unless a model keeps itself consistent (pykvm/bus.py, "Several vCPUs").
        self.device_lock = threading.RLock() if cpus > 1 else None
        self.pio = Bus("pio", lock=self.device_lock)
        self.mmio = Bus("mmio", lock=self.device_lock)
        self.internal_error_handlers: list[Callable[["Machine", E.InternalError], bool]] = []
        self.last_internal_error: E.InternalError | None = None
        # Called on every Interrupted exit (a kick or a signal): a chance to look at a vCPU that
        # has been inside KVM_RUN for a long time (pykvm.pvm.StuckVmcall).
        self.interrupted_handlers: list[Callable[["Machine"], object]] = []
        # Debug exits (single-step, breakpoints: KVM_SET_GUEST_DEBUG) go here: the gdb stub
        # (pykvm.gdb) sets it. Without one, a Debug exit stops the VM as an error.
        self.debug_handler: Callable[["Machine", E.Debug], Stop | None] | None = None
        # Kick the vCPU this often (seconds) while run() is active, so interrupted_handlers get to
        # look even at a guest that never exits. None: never.
        self.watchdog_period: float | None = None
        self.on_stop: list[Callable[[Stop], None]] = []
        # Called by close() before anything is torn down, last added first: whatever holds on to
        # guest memory or the vCPUs from a thread of its own (the gdb stub restoring its int3s
        # when gdb detaches) finishes while both are still there.
        self.on_close: list[Callable[[], None]] = []
        # How long run() has let the guest run: held while a debugger holds the vCPUs, so that
        # run(timeout) does not count the minutes someone spends in gdb (pykvm/runclock.py).
        self.run_clock = RunClock()
        # Called with every exit before it is dispatched (pykvm.trace.ExitTracer, --trace).
        self.trace: Callable[[E.Exit], None] | None = None
        # The C run loop (pykvm.kvm.fastpath): devices bind to it as they are added (pykvm.pc).
        self.fast = FastPath() if fast_path else None
        self._stop: Stop | None = None
        self._local = threading.local()     # .vcpu: the vCPU this thread runs
        self._thread: threading.Thread | None = None
        self._result: Stop | None = None
        self._done = threading.Event()

        # KVM on Intel needs these two guest-physical areas for real-mode emulation.
        self.vm.set_tss_addr(layout.KVM_TSS)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP)

        regions = []
        for slot, (gpa, size) in enumerate(layout.ram_regions(memory)):
            try:
                # ram(gpa, size): another backend, e.g. a snapshot's RAM mapped from its file
                backend = ram(gpa, size) if ram else MmapBackend(size, hugepages=hugepages)
            except OSError as e:    # ENOMEM: more than the host will map (a bad --memory)
                self.vm.close()
                if self._own_kvm:
                    self.kvm.close()
                raise MachineError(f"cannot map {memory >> 20} MiB of guest memory: "
                                   f"{e.strerror or e}") from None
            self.vm.set_user_memory_region(slot, gpa, size, backend.address())
            regions.append(Region(gpa, size, backend))
        self.mem = GuestMemory(regions)

        self.userirq = None
        self._eventfds: list[int] = []      # irqfds: closed with the VM
        if irqchip == "kernel":
            self.vm.create_irqchip()
            self.vm.create_pit2()
        elif irqchip not in ("none", "user"):
            raise MachineError(f"unknown irqchip mode {irqchip!r} (kernel, user or none)")
        # vCPU i gets APIC id i (KVM_CREATE_VCPU's id), as the MP table and the MADT list them.
        self.vcpus = [self.vm.create_vcpu() for _ in range(cpus)]
        if irqchip == "user":
            # The 8259 pair and the 8254 in Python (pykvm/devices/userirq.py explains the choice).
            from .devices.userirq import UserIrqChip
            self.userirq = UserIrqChip(kick=self.vcpu.kick, on_worker_error=self.worker_failed)
            self.userirq.register_on(self.pio)
        _install_kick_handler()

    @property
    def vcpu(self):
        """The vCPU of the calling thread inside the run loop; vCPU 0 (the BSP) anywhere else."""
        return getattr(self._local, "vcpu", None) or self.vcpus[0]

    # ---- assembly ----
    def irq_line(self, gsi: int) -> IrqLine:
        """The interrupt line a device on GSI `gsi` should drive."""
        if self.irqchip == "kernel":
            return KvmIrqLine(self.vm, gsi)
        if self.userirq is not None:
            return self.userirq.irq_line(gsi)
        raise MachineError("this machine has no interrupt controller (irqchip='none')")

    def edge_irq_line(self, gsi: int) -> IrqLine:
        """The line for a device whose interrupt is an edge at the controller (ISA-style): an irqfd
        with the in-kernel irqchip, else the same as irq_line()."""
        if self.irqchip == "kernel":
            line = IrqfdLine(self.vm, gsi)
            self._eventfds.append(line.fd)
            return line
        return self.irq_line(gsi)

    def add_pio(self, base: int, length: int, device, name: str | None = None) -> None:
        self.pio.register(base, length, device, name)

    def add_mmio(self, base: int, length: int, device, name: str | None = None) -> None:
        self.mmio.register(base, length, device, name)

    def add_exit_port(self, port: int = layout.PORT_EXIT, width: int = 4) -> ExitPort:
        """The port a guest ends the run through (firmware test programs do): a write of `status`
        stops the run loop with Stop(StopReason.EXIT, status). `width`: how many ports it claims
        (firmware writes a 32-bit `out`; the PC's own port takes one byte, pykvm/pc.py)."""
        exit_port = ExitPort(lambda status: self.request_stop(
            Stop(StopReason.EXIT, status, f"the guest wrote {status} to the exit port")))
        self.add_pio(port, width, exit_port, "exit port")
        return exit_port

    # ---- stopping ----
    def worker_failed(self, name: str, error: BaseException) -> None:
        """A VMM thread (ioeventfd, virtio-net receive, timer; pykvm/workers.py) died on an
        exception: count it and stop the VM with that error, rather than leave the guest waiting
        for a thread that is gone."""
        self.stats.worker_errors[name] += 1
        self.request_stop(Stop("error", message=f"VMM thread {name} failed: "
                                                f"{type(error).__name__}: {error}"))

    @property
    def stop_requested(self) -> bool:
        """True from request_stop() until the run loop has ended (for code that waits in a
        handler, like the gdb stub holding a vCPU, to know it should let go)."""
        return self._stop is not None

    def request_stop(self, stop: Stop) -> None:
        """Ask the run loop to end (from a device callback or any thread). The first request wins."""
        if self._stop is None:
            self._stop = stop
        for vcpu in self.vcpus:
            vcpu.kick()
        if self.userirq is not None:
            self.userirq.wake()      # a vCPU waiting in hlt

    def stop(self) -> Stop | None:
        """Stop a machine started with start(), and wait for its thread."""
        self.request_stop(Stop(StopReason.INTERRUPTED, message="stopped by the VMM"))
        return self.wait()

    # ---- running ----
    def run(self, timeout: float | None = None) -> Stop:
        """Run the vCPUs until the guest or the VMM stops them: vCPU 0 on this thread, the others
        on threads of their own (joined before this returns)."""
        timer = None
        self.run_clock.restart()
        if timeout is not None:
            # Counted in running time: the spans the gdb stub holds the vCPUs do not count.
            timer = RunDeadline(self.run_clock, timeout, lambda: self.request_stop(
                Stop(StopReason.TIMEOUT, message=f"no stop within {timeout:g} s of running")))
            timer.start()
        watchdog_stop = threading.Event()
        if self.watchdog_period:
            def watchdog(period=self.watchdog_period, vcpus=self.vcpus):
                while not watchdog_stop.wait(period):
                    for vcpu in vcpus:
                        vcpu.kick()
            start_worker("pykvm-watchdog", watchdog, self.worker_failed)
        aps = [threading.Thread(target=self._run_ap, args=(vcpu,), name=f"pykvm-vcpu{vcpu.index}",
                                daemon=True) for vcpu in self.vcpus[1:]]
        start = self._run_started = time.perf_counter()
        try:
            for t in aps:
                t.start()
            self._vcpu_loop(self.vcpus[0])
        except KeyboardInterrupt:
            self.request_stop(Stop(StopReason.INTERRUPTED, message="Ctrl-C"))
        finally:
            if self._stop is None:         # vCPU 0's loop failed: the others must end too
                self.request_stop(Stop(StopReason.ERROR, message="vCPU 0's run loop failed"))
            for t in aps:
                t.join()
            watchdog_stop.set()
            if timer is not None:
                timer.cancel()
            self.stats.wall_time += time.perf_counter() - start
            self._run_started = None
            for vcpu in self.vcpus:
                vcpu.kvm_run.immediate_exit = 0
        result = self._stop
        self._stop = None
        for fn in self.on_stop:
            fn(result)
        return result

    def _run_ap(self, vcpu) -> None:
        """An application processor's thread: its loop, and a host failure as the machine's stop."""
        try:
            self._vcpu_loop(vcpu)
        except BaseException as e:
            self.request_stop(Stop(StopReason.ERROR, message=f"vCPU {vcpu.index}: "
                                                             f"{type(e).__name__}: {e}"))

    def _vcpu_loop(self, vcpu) -> None:
        """One vCPU's run loop, on the calling thread, until a stop is requested."""
        vcpu.thread_id = threading.get_ident()
        self._local.vcpu = vcpu
        # The C fast path keeps one output buffer and one register block (pykvm.kvm.fastpath), so
        # only vCPU 0 uses it; the others take every exit through Python. Linux prints its
        # console from whichever CPU holds the console lock, and the UART model and its lock
        # serve them all.
        if self.fast is not None and vcpu is self.vcpus[0]:
            fast = self.fast
            run = lambda: vcpu.run_fast(fast)  # noqa: E731
        else:
            run = vcpu.run
        if self.userirq is not None:
            run = self._with_user_irqchip(run)
        trace = self.trace
        handlers = _HANDLERS    # handle_exit(), inlined: one call less per exit
        try:
            while self._stop is None:
                exit = run()
                if trace is not None:
                    trace(exit)
                try:                # a subscript costs ~50 ns less than dict.get(key, default)
                    handler = handlers[type(exit)]
                except KeyError:
                    handler = _unknown
                outcome = handler(self, exit)
                if outcome is not None:
                    self.request_stop(outcome)
        finally:
            self._local.vcpu = None
            vcpu.thread_id = None

    def _with_user_irqchip(self, run: Callable[[], E.Exit]) -> Callable[[], E.Exit]:
        """Wrap KVM_RUN with interrupt delivery from the Python PIC (contract: pykvm/devices/userirq.py).

        Before entering the guest: if the PIC has a request and the vCPU can take it now (IF set,
        not in an interrupt shadow), acknowledge it and inject the vector with KVM_INTERRUPT;
        otherwise ask KVM to exit as soon as the guest can (request_interrupt_window)."""
        chip, vcpu, kvm_run, clock = self.userirq, self.vcpu, self.vcpu.kvm_run, time.monotonic
        injected = self.stats.interrupts

        def run_with_interrupts() -> E.Exit:
            plan = chip.before_run(clock(), can_inject=bool(
                kvm_run.ready_for_interrupt_injection and kvm_run.if_flag))
            if plan.vector is not None:
                vcpu.interrupt(plan.vector)
                injected[plan.vector] += 1
            kvm_run.request_interrupt_window = 1 if plan.want_window else 0
            return run()

        return run_with_interrupts

    def start(self, timeout: float | None = None) -> None:
        """Run the vCPU in a background thread; `wait()` or `stop()` to finish."""
        if not _kick_handler_installed:
            raise MachineError("create the Machine in the main thread before start(): "
                               "only it can install the signal handler that stops a vCPU")
        self._done.clear()

        def body():
            try:
                self._result = self.run(timeout)
            except BaseException as e:  # a host failure: report it as the stop reason
                self._result = Stop(StopReason.ERROR, message=f"{type(e).__name__}: {e}")
            finally:
                self._done.set()

        self._thread = threading.Thread(target=body, name="pykvm-vcpu0", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> Stop | None:
        if self._thread is None:
            return self._result
        self._done.wait(timeout)
        if self._done.is_set():
            self._thread.join()
            self._thread = None
        return self._result

    @property
    def seconds_running(self) -> float:
        """Wall seconds spent in run() so far, the current run included."""
        started = getattr(self, "_run_started", None)
        return self.stats.wall_time + (time.perf_counter() - started if started else 0.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    # ---- teardown ----
    def close(self) -> None:
        if self.running:
            self.stop()
        while self.on_close:
            self.on_close.pop()()
        if self.userirq is not None:
            self.userirq.close()
        if self.fast is not None:
            self.fast.close()
        self.vm.close()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds.clear()
        self.mem.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
