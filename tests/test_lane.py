"""The AMD-V lane's parts, without QEMU or /dev/kvm: module dependencies, the L1 initramfs and
/init, the QEMU command line, the job script, how a run's end is read, where amdv tests run."""

import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path
import sys

import pytest

from pykvm import pvm
from pykvm.assets.cpio import read_cpio, write_cpio
from pykvm.assets.errors import AssetError
from pykvm.assets.kmod import depends, index, load_order, modinfo, module_name, read_module
from pykvm.assets.l1 import L1_MODULES, MODULES_LIST, init_script, initramfs_tree
from pykvm.lane import qemu
from pykvm.lane.pytest_plugin import DIRECT, LANE, SKIP, where_to_run
from pykvm.lane.runner import LANE_FAILED, LANE_TIMEOUT, _result, job_environment, job_script


# -- kernel modules ------------------------------------------------------------------------------

def fake_module(info: dict[str, str]) -> bytes:
    """An ELF relocatable with a .modinfo section (and the section-name table), as modpost writes."""
    modinfo_data = b"".join(f"{k}={v}\0".encode() for k, v in info.items())
    names = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    shoff = body_off + len(modinfo_data) + len(names)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    null = bytes(64)
    sh_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, body_off, len(modinfo_data), 0, 0, 1, 0)
    sh_names = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, body_off + len(modinfo_data), len(names), 0, 0, 1, 0)
    return ehdr + modinfo_data + names + null + sh_modinfo + sh_names


def test_modinfo_reads_the_section_strings():
    elf = fake_module({"license": "GPL", "depends": "kvm,ccp", "name": "kvm_amd"})
    assert modinfo(elf)["name"] == ["kvm_amd"]
    assert depends(elf) == ["kvm", "ccp"]
    assert depends(fake_module({"depends": ""})) == []


def test_modinfo_refuses_what_is_not_a_module():
    with pytest.raises(ValueError, match="not a little-endian 64-bit ELF"):
        modinfo(b"not an elf at all" * 8)
    elf = bytearray(fake_module({"name": "x"}))
    elf[elf.index(b".modinfo")] = ord("_")  # rename the section
    with pytest.raises(ValueError, match="no .modinfo"):
        modinfo(bytes(elf))


def test_module_names_and_index():
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("a/9pnet_virtio.ko.xz") == "9pnet_virtio"
    paths = index("kernel/arch/x86/kvm/kvm.ko\nkernel/arch/x86/kvm/kvm-amd.ko\n\n")
    assert paths == {"kvm": "kernel/arch/x86/kvm/kvm.ko", "kvm_amd": "kernel/arch/x86/kvm/kvm-amd.ko"}


DEPS = {"kvm_amd": "kvm,ccp", "kvm": "irqbypass", "ccp": "", "irqbypass": "", "9p": "9pnet,netfs,fscache",
        "9pnet": "", "netfs": "", "fscache": "netfs", "loop_a": "loop_b", "loop_b": "loop_a"}


def read_fake(rel: str) -> bytes:
    return fake_module({"depends": DEPS[module_name(rel)]})


PATHS = {name: f"kernel/{name}.ko" for name in DEPS}


def test_load_order_puts_dependencies_first_and_keeps_the_given_order():
    assert load_order(["kvm_amd"], PATHS, read_fake) == ["irqbypass", "kvm", "ccp", "kvm_amd"]
    # a list already in a good order comes back as it was
    good = ["irqbypass", "ccp", "kvm", "kvm_amd", "netfs", "fscache", "9pnet", "9p"]
    assert load_order(good, PATHS, read_fake) == good
    assert load_order(["9p", "kvm-amd"], PATHS, read_fake, builtin=["kernel/ccp.ko"]) == \
        ["9pnet", "netfs", "fscache", "9p", "irqbypass", "kvm", "kvm_amd"]


def test_load_order_errors_name_the_module():
    with pytest.raises(AssetError, match=r"kernel module nosuch \(needed by kvm\)"):
        load_order(["kvm"], {**PATHS, "kvm": "k/kvm.ko"},
                   lambda rel: fake_module({"depends": "nosuch"}))
    with pytest.raises(AssetError, match="cycle: loop_a -> loop_b -> loop_a"):
        load_order(["loop_a"], PATHS, read_fake)


def test_read_module_decompresses_what_it_finds(tmp_path):
    import lzma
    elf = fake_module({"name": "x"})
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "x.ko.xz").write_bytes(lzma.compress(elf))
    assert read_module(tmp_path, "kernel/x.ko") == elf
    (tmp_path / "kernel" / "y.ko").write_bytes(elf)
    assert read_module(tmp_path, "kernel/y.ko") == elf
    with pytest.raises(AssetError, match="missing"):
        read_module(tmp_path, "kernel/z.ko")


# -- the L1 initramfs and its /init ---------------------------------------------------------------

def test_l1_module_list_is_what_the_lane_needs():
    for needed in ("kvm", "kvm_amd", "virtio_pci", "9pnet_virtio", "9p"):
        assert needed in L1_MODULES


def test_initramfs_tree_holds_init_busybox_and_modules_in_order():
    modules = [("irqbypass", b"A"), ("kvm", b"BB"), ("kvm_amd", b"CCC")]
    entries = {e.name: e for e in read_cpio(write_cpio(
        initramfs_tree(b"\x7fELF-busybox", ["bin/sh", "sbin/insmod", "usr/bin/stty"], modules, "#!/bin/sh\n")))}
    assert entries["init"].data == b"#!/bin/sh\n" and entries["init"].mode & 0o111
    assert entries["bin/busybox"].data == b"\x7fELF-busybox"
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"/bin/busybox"
    assert entries["usr/bin/stty"].is_symlink
    assert entries["lib/modules/kvm.ko"].data == b"BB"
    assert entries[MODULES_LIST].data == b"irqbypass\nkvm\nkvm_amd\n"
    assert entries["dev/console"].is_char_device and entries["dev/console"].rdev == (5, 1)
    for mountpoint in ("host", "share", "proc", "sys", "dev"):
        assert entries[mountpoint].is_dir


def test_init_script_is_valid_shell_and_does_its_steps():
    text = init_script()
    sh = shutil.which("dash") or shutil.which("sh")
    p = subprocess.run([sh, "-n"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    busybox = shutil.which("busybox")
    if busybox:
        p = subprocess.run([busybox, "sh", "-n"], input=text, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    for step in ("insmod", f"mount -t 9p -o \"$opts,ro,cache=loose\" {qemu.ROOT_TAG} /host",
                 f"{qemu.SHARE_TAG} /share", "mount -t devtmpfs devtmpfs /host/dev", "/host/dev/shm",
                 "/host/run", "/host/tmp", "chroot /host /bin/sh \"$share/job.sh\"", "> /share/status",
                 "poweroff -f", f"{qemu.SHARE_ARG}=*", "/dev/ttyS1"):
        assert step in text, step


def test_init_script_runs_the_job_and_reports_its_status(tmp_path):
    """/init's flow, run by busybox on the host with its system calls replaced by shell functions
    that log: the job runs in the chroot with its output on ttyS1, and its status reaches /share."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed on this host")
    text = init_script()
    log = tmp_path / "log"
    fake = tmp_path / "fake"
    (fake / "share").mkdir(parents=True)
    stubs = f"""
log() {{ echo "$*" >> {log}; }}
mount() {{ log mount "$@"; }}
insmod() {{ log insmod "$@"; }}
mkdir() {{ :; }}
ip() {{ :; }}
stty() {{ :; }}
sync() {{ :; }}
sleep() {{ :; }}
poweroff() {{ log poweroff "$@"; exit 0; }}
chroot() {{ log chroot "$@"; return 7; }}
"""
    # Point the absolute paths /init uses at the fake tree, and put the stubs before its first command.
    cmdline = f"{qemu.SHARE_ARG}=/tmp/pykvm-lane-x quiet {qemu.EXPORT_ARG.format(0)}=/tmp/ci/checkout"
    body = (text.replace("$(cat /proc/cmdline)", cmdline)
                .replace("/etc/pykvm-modules", str(fake / "modules"))
                .replace("[ -c /dev/kvm ]", "true")
                .replace("$(cat /sys/module/kvm_amd/parameters/npt)", "Y")
                .replace("$(cat /sys/module/kvm_amd/parameters/nested)", "1")
                .replace("> /share/status", f"> {fake}/share/status")
                .replace("> /dev/ttyS1", f"> {fake}/ttyS1"))
    first = body.index("\nmount -t proc")
    script = body[:first] + stubs + body[first:]
    (fake / "modules").write_text("kvm\nkvm_amd\n")
    p = subprocess.run([busybox, "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    calls = log.read_text()
    assert "insmod /lib/modules/kvm.ko\ninsmod /lib/modules/kvm_amd.ko" in calls
    assert f"chroot /host /bin/sh /tmp/pykvm-lane-x/job.sh" in calls
    assert "mount --bind /share /host/tmp/pykvm-lane-x" in calls
    # A checkout under /tmp comes back, read-only, after the fresh /tmp is mounted.
    export = next(line for line in calls.splitlines()
                  if line.endswith(f" {qemu.EXPORT_TAG.format(0)} /host/tmp/ci/checkout"))
    assert export.startswith("mount -t 9p -o ") and ",ro,cache=loose " in export, export
    assert calls.index("mount -t tmpfs tmpfs /host/tmp") < calls.index(export) < calls.index("chroot")
    assert calls.rstrip().endswith("poweroff -f")
    assert (fake / "share" / "status").read_text() == "7\n"
    assert "pykvm-lane: exit status 7" in p.stdout


# -- QEMU ---------------------------------------------------------------------------------------

def test_qemu_command_line(tmp_path):
    argv = qemu.command_line("/usr/bin/qemu-system-x86_64", tmp_path / "vmlinuz", tmp_path / "l1.cpio",
                             tmp_path / "run", tmp_path / "run" / "console.log")
    joined = " ".join(argv)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "svm" in argv[argv.index("-cpu") + 1]
    assert argv[argv.index("-smp") + 1] == "1"
    assert "-no-reboot" in argv and "-nodefaults" in argv
    append = argv[argv.index("-append") + 1]
    assert "panic=-1" in append and f"{qemu.SHARE_ARG}={tmp_path / 'run'}" in append
    virtfs = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    root = next(v for v in virtfs if f"mount_tag={qemu.ROOT_TAG}" in v)
    share = next(v for v in virtfs if f"mount_tag={qemu.SHARE_TAG}" in v)
    assert "path=/," in root and "readonly=on" in root
    assert f"path={tmp_path / 'run'}," in share and "readonly" not in share
    assert f"file:{tmp_path / 'run' / 'console.log'}" in joined and "stdio" in argv


def test_qemu_command_line_exports_read_only_shares(tmp_path):
    exports = [Path("/tmp/ci/checkout"), Path("/run/cache")]
    argv = qemu.command_line("qemu", tmp_path / "vmlinuz", tmp_path / "l1.cpio", tmp_path / "run",
                             tmp_path / "console.log", exports=exports)
    append = argv[argv.index("-append") + 1]
    virtfs = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    for i, path in enumerate(exports):
        assert f"{qemu.EXPORT_ARG.format(i)}={path}" in append.split()
        share = next(v for v in virtfs if f"mount_tag={qemu.EXPORT_TAG.format(i)}," in v)
        assert f"path={path}," in share and "readonly=on" in share


def test_qemu_command_line_refuses_white_space_in_the_share():
    with pytest.raises(qemu.LaneError, match="white space"):
        qemu.kernel_cmdline("/tmp/a b")


def test_missing_qemu_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(qemu.LaneUnavailable) as e:
        qemu.qemu_binary()
    assert "qemu-system-x86_64 not found" in str(e.value) and "qemu-system-x86" in str(e.value)
    assert "\n" not in str(e.value)


def test_selftest_without_qemu_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "PYKVM_QUIET": "1"}
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "selftest", "--", "true"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("pykvm: error: qemu-system-x86_64 not found"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# -- the job --------------------------------------------------------------------------------------

def test_job_script_runs_exactly_the_command_in_its_directory_with_its_environment(tmp_path):
    work = tmp_path / "dir with 'quotes'"
    work.mkdir()
    argv = [sys.executable, "-c", "import os, sys; print(os.getcwd()); print(sys.argv[1:]); "
            "print(sorted((k, v) for k, v in os.environ.items() if k.startswith('T_') or k == 'PATH'))",
            "a b", "$HOME", "it's"]
    env = {"T_ONE": "x y", "T_TWO": "$(echo no)", "PATH": "/usr/bin:/bin"}
    script = tmp_path / "job.sh"
    script.write_text(job_script(argv, work, env))
    p = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True, env={"T_LEAK": "1"})
    assert p.returncode == 0, p.stderr
    cwd, args, environ = p.stdout.splitlines()
    assert cwd == str(work)
    assert args == str(["a b", "$HOME", "it's"])
    assert environ == str([("PATH", "/usr/bin:/bin"), ("T_ONE", "x y"), ("T_TWO", "$(echo no)")])


def test_job_script_exit_statuses(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(job_script(["sh", "-c", "exit 9"], tmp_path, {"PATH": "/usr/bin:/bin"}))
    assert subprocess.run(["/bin/sh", str(script)]).returncode == 9
    script.write_text(job_script(["true"], tmp_path / "gone", {"PATH": "/usr/bin:/bin"}))
    assert subprocess.run(["/bin/sh", str(script)], capture_output=True).returncode == 126
    with pytest.raises(ValueError):
        job_script([], tmp_path, {})


def test_job_environment_points_temporary_files_at_the_share(tmp_path):
    env = job_environment({"HOME": "/root", "PYTEST_CURRENT_TEST": "x", "BAD": "a\nb"}, tmp_path)
    assert env["TMPDIR"] == str(tmp_path / "tmp") and env["HOME"] == "/root"
    assert env["PYKVM_LANE_INNER"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "PYTEST_CURRENT_TEST" not in env and "BAD" not in env


# -- how a run ended ------------------------------------------------------------------------------

def write_run(tmp_path, console="", status=None, output="", qemu_log=""):
    (tmp_path / "l1-console.log").write_text(console)
    (tmp_path / "output.log").write_text(output)
    (tmp_path / "qemu.log").write_text(qemu_log)
    if status is not None:
        (tmp_path / "status").write_text(f"{status}\n")
    return tmp_path


def test_result_reads_the_status_file(tmp_path):
    r = _result(write_run(tmp_path, "boot\npykvm-lane: exit status 3\n", status=3, output="out"), False, 60)
    assert (r.status, r.error, r.output) == (3, None, "out") and not r.ok


def test_result_falls_back_to_the_console_line(tmp_path):
    r = _result(write_run(tmp_path, "x\npykvm-lane: exit status 0\n"), False, 60)
    assert (r.status, r.error) == (0, None) and r.ok


def test_result_names_an_init_failure_a_panic_or_a_qemu_error(tmp_path):
    r = _result(write_run(tmp_path, "pykvm-lane: error: insmod kvm_amd failed\npykvm-lane: exit status 125\n",
                          status=125), False, 60)
    assert r.status == LANE_FAILED and r.error == "L1 /init: insmod kvm_amd failed"
    (tmp_path / "status").unlink()
    r = _result(write_run(tmp_path, "[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root\n"), False, 60)
    assert r.status == LANE_FAILED and r.error == "L1 kernel panic: not syncing: VFS: Unable to mount root"
    r = _result(write_run(tmp_path, "", qemu_log="qemu: warning: TCG doesn't support requested feature\n"
                          "qemu-system-x86_64: -virtfs x: cannot open\n"), False, 60)
    assert r.error == "QEMU: qemu-system-x86_64: -virtfs x: cannot open"


def test_console_tail_leaves_out_known_noise(tmp_path):
    noise = "[ 81.6] kvm [141]: vcpu0, guest rIP: 0xffffffff81002f9d Unhandled WRMSR(0xc0010007) = 0xffff"
    r = _result(write_run(tmp_path, "\n".join(["a", noise, "b", noise])), False, 60)
    assert r.console_tail(2) == "a\nb"
    assert noise in r.console


def test_result_of_a_timeout(tmp_path):
    r = _result(write_run(tmp_path, "\n".join(f"line {i}" for i in range(100))), True, 30)
    assert r.status == LANE_TIMEOUT and r.error == "the lane timed out after 30 s"
    assert r.console_tail(2) == "line 98\nline 99"


# -- where amdv tests run -------------------------------------------------------------------------

@pytest.mark.parametrize("kind, usable, inner, has_qemu, switch, mode, words", [
    (pvm.AMD_V, True, False, False, "", DIRECT, ""),
    (pvm.INTEL_VTX, True, True, False, "", DIRECT, ""),
    (pvm.KVM_PVM, True, False, True, "", LANE, ""),
    (pvm.UNKNOWN, False, False, True, "", LANE, ""),
    (pvm.AMD_V, False, False, True, "", LANE, ""),
    (pvm.KVM_PVM, True, False, False, "", SKIP, "KVM-PVM, and qemu-system-x86_64"),
    (pvm.KVM_PVM, True, True, True, "", SKIP, "inside the AMD-V lane"),
    (pvm.KVM_PVM, True, False, True, "0", SKIP, "switched off (PYKVM_LANE=0)"),
    (pvm.UNKNOWN, False, False, False, "", SKIP, "no VT-x/AMD-V /dev/kvm"),
])
def test_where_amdv_tests_run(kind, usable, inner, has_qemu, switch, mode, words):
    got, reason = where_to_run(kind, kvm_usable=usable, inner=inner, qemu=has_qemu, switch=switch)
    assert got == mode
    assert words in reason


def test_directories_under_a_fresh_tmp_or_run_are_exported_and_the_rest_refused():
    from pykvm.lane.qemu import LaneError
    from pykvm.lane.runner import exported_paths
    run_dir = Path("/tmp/pykvm-lane-x")
    for hidden in ("/tmp", "/run", "/dev/shm/x", "/proc/1", "/sys/kernel"):
        with pytest.raises(LaneError, match=f"cannot run in {hidden}: the lane mounts a fresh /"):
            exported_paths(Path(hidden), run_dir)
    assert exported_paths(Path("/tmp/pykvm-lane-x/basetemp"), run_dir) == []  # the share is there
    assert exported_paths(Path("/work/checkout"), run_dir, [Path("/root/.cache/pykvm")]) == []
    assert exported_paths(Path("/temporary"), run_dir) == []
    # A CI clone in /tmp, its cache inside it or beside it: each directory once, the outermost.
    assert exported_paths(Path("/tmp/ci/checkout"), run_dir, [Path("/root/.cache/pykvm")]) == \
        [Path("/tmp/ci/checkout")]
    assert exported_paths(Path("/tmp/ci/checkout"), run_dir, [Path("/tmp/ci")]) == [Path("/tmp/ci")]
    assert exported_paths(Path("/run/user/0/co"), run_dir, [Path("/tmp/cache")]) == \
        [Path("/run/user/0/co"), Path("/tmp/cache")]


def test_selftest_from_a_hidden_directory_exits_2_with_one_line(tmp_path):
    if shutil.which(qemu.QEMU) is None:
        pytest.skip(f"{qemu.QEMU} is not installed: the QEMU check comes first")
    hidden = Path("/tmp")
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "selftest", "--", "true"], capture_output=True,
                       text=True, cwd=hidden, timeout=120, env={**os.environ, "PYKVM_QUIET": "1"})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("pykvm: error: cannot run in /tmp: the lane mounts a fresh /tmp over the "
                                "host's, so start from a directory below it or outside it")


def test_an_asset_missing_in_the_lane_is_named_not_built(tmp_path, monkeypatch):
    from pykvm.assets.cache import cached
    built = []
    monkeypatch.setenv("PYKVM_LANE_INNER", "1")
    with pytest.raises(AssetError, match=r"asset firmware \(\w+\) is not in the cache, which is read-only in "
                                         r"the AMD-V lane: build it on the host"):
        cached("firmware", {"x": "1"}, built.append, root=tmp_path)
    assert built == [] and list(tmp_path.iterdir()) == []
    monkeypatch.delenv("PYKVM_LANE_INNER")
    assert cached("firmware", {"x": "1"}, built.append, root=tmp_path).is_dir() and len(built) == 1
