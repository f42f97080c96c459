"""`RunnableVM`: what every assembled VM (LinuxVM, MultibootVM) does with its Machine once built.

    vm.run(timeout)        # on this thread, until the guest stops: the Stop
    vm.start(timeout)      # on a thread of its own; then vm.wait(timeout) or vm.stop()
    vm.stats               # the machine's counters (exits by reason over all vCPUs, ...)
    with vm: ...           # close() at the end

A subclass builds `self.machine` (pykvm.machine.Machine) and `self.console`, and may add to
`_before_run()` (LinuxVM starts its virtio back-ends there) and to `stats`.
"""

from __future__ import annotations

from .stop import Stop


class RunnableVM:
    machine = None          # set by the subclass's constructor

    def _before_run(self) -> None:
        """Called before the vCPUs first enter the guest (run or start)."""

    def run(self, timeout: float | None = None) -> Stop:
        """Run on this thread until the guest stops (or `timeout` seconds pass)."""
        self._before_run()
        return self.machine.run(timeout)

    def start(self, timeout: float | None = None) -> None:
        """Run in a background thread; use console.expect(), then stop() or wait()."""
        self._before_run()
        self.machine.start(timeout)

    def wait(self, timeout: float | None = None) -> Stop | None:
        return self.machine.wait(timeout)

    def stop(self) -> Stop | None:
        return self.machine.stop()

    @property
    def stats(self) -> dict:
        """The machine's counters: exits by reason (all vCPUs together), time in KVM_RUN, in
        the run loop and halted waiting for an interrupt in the VMM (irqchip="user"), PVM gaps completed, guest mistakes, interrupts injected, unclaimed ports,
        exits answered in C, worker-thread failures, and what the console dropped."""
        from .kvm.stats import summed as kvm_summed
        m = self.machine
        exits: dict[str, int] = {}
        for vcpu in m.vcpus:
            for reason, n in vcpu.exit_counts().items():
                exits[reason] = exits.get(reason, 0) + n
        return {
            "exits": exits,
            "seconds_in_kvm_run": round(sum(v.seconds_in_run for v in m.vcpus), 3),
            "seconds_in_run_loop": round(m.seconds_running, 3),
            # irqchip="user" only: idle in hlt, waited out by the VMM (KVM_RUN's with "kernel")
            "seconds_halted": round(m.stats.seconds_halted, 3),
            "pvm_gaps_completed": dict(m.stats.pvm_gaps),
            "guest_errors": dict(m.stats.guest_errors),
            "interrupts_injected": dict(m.stats.interrupts),
            "unclaimed_ports": m.pio.unclaimed,
            "serial_bytes_out": self.devices.serial.bytes_out,
            "exits_handled_in_c": m.fast.handled if m.fast else 0,
            "console_bytes_dropped": self.console.dropped,   # beyond the kept tail (console.py)
            "worker_errors": dict(m.stats.worker_errors),
            # KVM's own counters (pykvm/kvm/stats.py): every exit, emulated instructions, ...
            "kvm": kvm_summed([vcpu.kvm_stats() for vcpu in m.vcpus]),
        }

    def close(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
