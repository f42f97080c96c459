"""gdb's commands and the stub's replies (GDB manual, "Remote Protocol", E.2 "Packets" and E.4
"General Query Packets"). Each packet's payload in, the reply's payload out (None: no reply now -
`c`/`s`/`vCont` are answered by a stop reply once the vCPUs are held again).

Registers (g/G/p/P) and memory (m/M/X) act on the vCPU selected with `Hg` (gdb's "general"
thread); `Hc` selects the one `c`/`s` apply to. Replies `Exx` are errors: E01 a bad thread or
register, E14 (EFAULT) memory that is not there, E22 (EINVAL), E28 (ENOSPC) from breakpoints.
"""

from __future__ import annotations

from ..stop import Stop, StopReason
from . import registers as R

SUPPORTED = "PacketSize=20000;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;QStartNoAckMode+"
DETACH = "__detach__"                   # not a reply: the session ends after "OK"


class Commands:
    """The command side of a GdbStub session: `reply(text, raw)` for each packet."""

    def __init__(self, stub):
        self.stub = stub
        self.control = stub.control
        self.cpus = stub.control.cpus
        self.regs = stub.regs
        self.memory = stub.memory
        self.g_cpu = self.cpus[0]           # registers and memory (Hg)
        self.c_cpu = self.cpus[0]           # step (Hc)
        self.noack = False

    def reply(self, text: str, raw: bytes) -> str | None:
        head = text[:1]
        if text == "?":
            return self.stub.last_stop
        if text.startswith("qSupported"):
            return SUPPORTED
        if text == "QStartNoAckMode":
            self.noack = True
            return "OK"
        if text.startswith("qXfer:features:read:"):
            return self._xfer(text)
        if text == "qAttached":
            return "1"                         # attached to an existing process: `kill` asks first
        if text == "qC":
            return f"QC{self.g_cpu.tid:x}"
        if text == "qfThreadInfo":
            return "m" + ",".join(f"{c.tid:x}" for c in self.cpus)
        if text == "qsThreadInfo":
            return "l"
        if text.startswith("qThreadExtraInfo,"):
            cpu = self._cpu_by_tid(int(text.split(",")[1], 16))
            return f"vCPU {cpu.tid - 1}".encode().hex() if cpu else "E01"
        if text.startswith("qRcmd,"):
            return self._monitor(bytes.fromhex(text[6:]).decode(errors="replace").strip())
        if text.startswith("Qqemu.PhyMemMode:"):
            self.memory.phys_mode = text.endswith("1")
            return "OK"
        if text == "qqemu.PhyMemMode":
            return "1" if self.memory.phys_mode else "0"
        if head == "H":
            cpu = self._cpu_by_tid(_tid(text[2:]))
            if cpu is None:
                return "E01"
            if text[1] == "g":
                self.g_cpu = cpu
            else:
                self.c_cpu = cpu
            return "OK"
        if head == "T":
            return "OK" if self._cpu_by_tid(_tid(text[1:])) else "E01"
        if text == "g":
            rf = self.g_cpu.register_file()
            return "".join(R.encode(r, rf) for r in self.regs)
        if head == "G":
            return self._write_all(text[1:])
        if head == "p":
            n = int(text[1:], 16)
            return R.encode(self.regs[n], self.g_cpu.register_file()) if n < len(self.regs) else "E00"
        if head == "P":
            n, _, value = text[1:].partition("=")
            return self._write_reg(int(n, 16), value)
        if head == "m":
            addr, length = (int(x, 16) for x in text[1:].split(","))
            data = self.memory.read(self.g_cpu, addr, length)
            return data.hex() if data is not None else "E14"
        if head == "M":
            where, _, hexdata = text[1:].partition(":")
            addr = int(where.split(",")[0], 16)
            return "OK" if self.memory.write(self.g_cpu, addr, bytes.fromhex(hexdata)) else "E14"
        if head == "X":                        # binary data, already unescaped by the reader
            colon = raw.index(b":")
            addr = int(text[1:colon].split(",")[0], 16)
            return "OK" if self.memory.write(self.g_cpu, addr, raw[colon + 1:]) else "E14"
        if head in "Zz" and len(text) > 2:
            return self.stub.breakpoints.packet(text)
        if head in "cC":
            self.stub.release({})
            return None
        if head in "sS":
            self.stub.release({c: ("s" if c is self.c_cpu else None) for c in self.cpus})
            return None
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            return self._vcont(text[6:])
        if text == "vMustReplyEmpty":
            return ""
        if head == "D":
            return DETACH
        if head == "k":
            self.stub.machine.request_stop(Stop(StopReason.INTERRUPTED, message="gdb killed the guest"))
            return DETACH
        return ""                             # anything else: "not supported"

    def _cpu_by_tid(self, tid: int):
        if tid in (0, -1):                    # "any" and "all": the first
            return self.cpus[0]
        return next((c for c in self.cpus if c.tid == tid), None)

    def _xfer(self, text: str) -> str:
        """qXfer:features:read:target.xml:OFFSET,LENGTH - the target description, in pieces."""
        annex, _, span = text[len("qXfer:features:read:"):].partition(":")
        if annex != "target.xml":
            return "E00"
        xml = self.stub.xml
        offset, length = (int(x, 16) for x in span.split(","))
        chunk = xml[offset:offset + length]
        return ("l" if offset + length >= len(xml) else "m") + chunk.decode()

    def _monitor(self, cmd: str) -> str:
        """gdb's `monitor CMD` (qRcmd): the output goes back hex-encoded."""
        if cmd in ("phys on", "phys off"):
            self.memory.phys_mode = cmd.endswith("on")
            out = f"memory commands now use {'physical' if self.memory.phys_mode else 'virtual'} addresses\n"
        else:
            out = "pykvm monitor commands: phys on | phys off (m/M/X on guest-physical addresses)\n"
        return out.encode().hex()

    def _vcont(self, spec: str) -> str | None:
        """vCont;ACTION[:TID];...: the first action naming a thread wins for it; one without a
        thread is the default for the rest. C/S (with a signal) act as c/s: a VM has no signals."""
        actions: dict = {}
        default = None
        for part in spec.split(";"):
            act, _, tid = part.partition(":")
            kind = {"c": "c", "C": "c", "s": "s", "S": "s"}.get(act[:1])
            if kind is None:
                return "E01"
            if tid:
                cpu = self._cpu_by_tid(_tid(tid))
                if cpu is not None and cpu not in actions:
                    actions[cpu] = kind
            elif default is None:
                default = kind
        for cpu in self.cpus:
            actions.setdefault(cpu, default)
        if all(a is None for a in actions.values()):
            return "E01"
        self.stub.release(actions)       # a vCPU whose action is None stays held
        return None

    def _write_reg(self, n: int, value: str) -> str:
        if n >= len(self.regs):
            return "E00"
        reg = self.regs[n]
        if reg.set is None:
            return "E01"
        reg.set(self.g_cpu.register_file(), R.decode(reg, value))
        return "OK"

    def _write_all(self, data: str) -> str:
        rf, at = self.g_cpu.register_file(), 0
        for reg in self.regs:
            width = reg.size * 2
            if at + width > len(data):
                break
            if reg.set is not None:
                reg.set(rf, R.decode(reg, data[at:at + width]))
            at += width
        return "OK"


def _tid(text: str) -> int:
    return -1 if text == "-1" else int(text or "0", 16)
