"""Row 6 of the table: restoring a snapshot against booting, and the memory of clones.

    python -m bench.snapshot [--quick] [--clones N]

6a. Restore to the first guest instruction: a fresh process restores the snapshot (reads and
    checks the file, builds the VM, maps RAM from the file, puts vCPU/irqchip/device state back)
    and enters the guest; the time is from the process's first statement (importing pykvm
    included) to the first exit after the guest ran (the guest has executed instructions by
    then). Baseline: a cold boot of the test kernel in a fresh process to the same point, from
    its first statement to the console line the snapshot was saved at. Two save points
    (SAVE_POINTS), each its own cold boot, snapshot and restores in the same run: the kernel's
    first line (the shortest boot that still ends inside a running kernel) and "Run /init" (the
    end of the kernel's boot, where a test suite saves). Goal (issue 13): restore >=100x faster.
6b. Memory of N clones against N cold boots: N processes restore the snapshot side by side and
    let the guest run on for a moment (RUN_ON seconds); each then reports its proportional set
    size (Pss, /proc/self/smaps_rollup: a page shared by k processes counts 1/k in each) and the
    Pss of its guest RAM alone. Baseline: the cold-booted VM's own Pss at the save point, times N
    (cold boots share no guest pages: their RAM is anonymous memory). The ratio is clones' total
    over cold boots' total; the line under it gives guest RAM alone.

Both need the test kernel (not built here unless --build). Timings on a KVM-PVM host include
its emulated early boot; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.table import Goal, Row, Section, format_table  # noqa: E402

SAVE_POINTS = (r"Linux version", r"Run /init as init process")
SAVE_AT = SAVE_POINTS[0]                # the snapshot the clones of 6b are restored from
MEMORY = "64M"
RUN_ON = 1.0
GOAL_RESTORE = Goal(">=", 100)        # issue 13: cold boot / restore
GOAL_MEMORY = Goal("<=", 0.5)         # clones' memory against cold boots' (issue 13: shared pages)

# A cold boot to SAVE_AT, saved there; prints the timings and its memory as JSON.
_COLD = r"""
import json, sys, time
t0 = time.perf_counter()
from pykvm.linux import LinuxVM
from bench.snapshot import memory_report
t_imported = time.perf_counter()
vm = LinuxVM(sys.argv[1], initrd=sys.argv[2], memory=sys.argv[3], until=sys.argv[4])
stop = vm.run(600)
t1 = time.perf_counter()
assert stop.reason == "until", stop
mem = memory_report(vm)
vm.save(sys.argv[5])
vm.close()
print(json.dumps({"seconds": t1 - t0, "imports": t_imported - t0, **mem}))
"""

# A restore to the first exit after entering the guest; then (clones) a moment of running on.
_RESTORE = r"""
import json, sys, time
t0 = time.perf_counter()
from pykvm.linux import LinuxVM
from pykvm.stop import Stop
from bench.snapshot import memory_report
t_imported = time.perf_counter()
vm = LinuxVM.restore(sys.argv[1], clone=True)
first = []
def trace(exit):
    if not first:
        first.append(time.perf_counter())
        vm.machine.request_stop(Stop("interrupted", message="first exit"))
vm.machine.trace = trace
vm.run(60)
vm.machine.trace = None
out = {"seconds": first[0] - t0, "imports": t_imported - t0}
run_on = float(sys.argv[2])
if run_on:
    sys.stdout.write("ready\n"); sys.stdout.flush()
    sys.stdin.readline()                 # all clones restored: run on together
    vm.run(run_on)
    out.update(memory_report(vm))
    sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
    sys.stdin.readline()                 # stay alive until every clone has reported
else:
    print(json.dumps(out))
vm.close()
"""


def memory_report(vm) -> dict:
    """This process's Pss and the Pss of its guest RAM mappings, in MiB."""
    ram = {(r.backend.address(), r.size) for r in vm.machine.mem.regions}
    total = guest = 0
    with open("/proc/self/smaps") as f:
        current = None
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(x, 16) for x in first.split("-"))
                current = (lo, hi - lo) in ram
            elif first == "Pss:":
                kb = int(line.split()[1])
                total += kb
                if current:
                    guest += kb
    return {"pss_mib": total / 1024, "guest_pss_mib": guest / 1024}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(code: str, *args: str, timeout: float = 900) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=timeout, env=_env(), cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _clones(path: str, n: int) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", _RESTORE, path, str(RUN_ON)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=_env(), cwd=REPO) for _ in range(n)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a clone did not start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.write("done\n")
            p.stdin.flush()
            p.wait(60)
        return reports
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _restore_row(path: str, cold: dict, save_at: str, count: int) -> Row:
    runs = sorted((_run(_RESTORE, path, "0") for _ in range(count)), key=lambda r: r["seconds"])
    restores = [r["seconds"] for r in runs]
    restore = restores[len(restores) // 2]
    imports = runs[len(runs) // 2]["imports"]
    name = save_at.split(" as ")[0]
    return Row(f"restore (saved at {name!r})", restore * 1e3, "ms",
               cold["seconds"] * 1e3, "cold boot to that line",
               goal=GOAL_RESTORE, ratio=cold["seconds"] / restore,
               details=[f"to the first guest exit after the restored guest ran, against a cold "
                        f"boot to the console line {name!r}",
                        f"ratio is cold boot / restore (higher is better); median of "
                        f"{len(restores)} restores, each in a fresh process "
                        f"({', '.join(f'{s * 1e3:.0f}' for s in restores)} ms)",
                        f"of the median restore, {imports * 1e3:.0f} ms are importing "
                        "pykvm; the rest reads the file, builds the VM, maps RAM and "
                        "sets state",
                        f"without the imports (both sides pay them): restore "
                        f"{(restore - imports) * 1e3:.0f} ms, cold boot "
                        f"{cold['seconds'] - cold['imports']:.1f} s, "
                        f"{(cold['seconds'] - cold['imports']) / (restore - imports):.0f}x"])


def snapshot_rows(quick: bool = False, build: bool = False, clones: int | None = None) -> Section:
    from pykvm.assets import initramfs, test_kernel
    kernel = test_kernel(build=build)
    n = clones or (4 if quick else 8)
    # Byte-compile pykvm first, as `pip install` does (where PYTHONDONTWRITEBYTECODE is set, every
    # fresh process would otherwise compile its sources again: bench/startup.py does the same).
    import compileall
    compileall.compile_dir(str(REPO / "pykvm"), quiet=1)
    compileall.compile_dir(str(REPO / "bench"), quiet=1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        snapshots = {}
        for index, save_at in enumerate(SAVE_POINTS):
            path = os.path.join(d, f"bench{index}.snap")
            cold = _run(_COLD, str(kernel.bzimage), str(initramfs()), MEMORY, save_at, path)
            snapshots[save_at] = (path, cold)
            rows.append(_restore_row(path, cold, save_at, 3 if quick else 5))
        path, cold = snapshots[SAVE_AT]
        reports = _clones(path, n)
    total = sum(r["pss_mib"] for r in reports)
    guest = sum(r["guest_pss_mib"] for r in reports)
    rows.append(Row(f"memory of {n} clones (Pss)", total, "MiB", cold["pss_mib"] * n,
                    f"{n} cold boots ({n} x {cold['pss_mib']:.0f})", goal=GOAL_MEMORY,
                    details=[f"guest RAM alone: clones {guest:.1f} MiB in all against "
                             f"{n} x {cold['guest_pss_mib']:.1f} = {n * cold['guest_pss_mib']:.1f}"
                             f" MiB; each clone ran on {RUN_ON:g} s after restoring"]))
    return Section("6. Snapshots (issue 13)", rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--clones", type=int)
    opts = ap.parse_args(argv)
    from bench import header_lines
    print(format_table("pykvm snapshots", header_lines(),
                       [snapshot_rows(opts.quick, opts.build, opts.clones)], []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
