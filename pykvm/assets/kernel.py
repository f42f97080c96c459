"""The pykvm test kernel: Debian's linux-source-6.1, tinyconfig plus a fragment kept in the repo.

Recipe (each step prints a progress line):

1. ``apt-get install`` the build dependencies and ``linux-source-6.1`` if the
   host lacks them (:data:`BUILD_PACKAGES`; needs root, else the error says
   what to run).
2. Unpack ``/usr/src/linux-source-6.1.tar.xz`` once into the cache
   (``linux-source/<key>/``, keyed by the package version). The tree stays
   pristine: builds go to a separate output directory (``make O=...``).
3. ``make tinyconfig`` (x86_64), merge ``pykvm-6.1.config`` with
   ``scripts/kconfig/merge_config.sh -m``, ``make olddefconfig``.
4. Check that every option the fragment sets survived olddefconfig (a
   dependency that is not met silently drops an option); warn about the ones
   that did not.
5. ``make -jN bzImage`` (which also links ``vmlinux``), reporting every
   :data:`REPORT_EVERY` compiled files; the full log is kept as ``build.log``.
6. Keep ``bzImage``, ``vmlinux`` (ELF with the PVH entry note), ``.config``
   (as ``config``), ``System.map`` and ``build.log``; drop the object tree.
   (The object tree is kept until the build succeeds, in
   ``test-kernel/.build-<key>/``, so that a failed or interrupted build
   resumes instead of starting over.)

The cache key covers the source package version, the fragment's settings
(not its comments), the compiler's version line and :data:`RECIPE_VERSION`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import debian
from .cache import cache_key, cache_root, cached, entry_dir
from .errors import AssetError
from .progress import Progress, format_elapsed

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT_NAME = "pykvm-6.1.config"
BUILD_PACKAGES = ["build-essential", "bc", "flex", "bison", "libelf-dev", "libssl-dev",
                  "cpio", "xz-utils", "lz4", SOURCE_PACKAGE]
RECIPE_VERSION = "1"
REPORT_EVERY = 100  # compiled files between progress lines
_ARCH = "x86_64"
# Reproducible-ish builds: no user, host or date of the builder in the image.
_BUILD_ENV = {"KBUILD_BUILD_USER": "pykvm", "KBUILD_BUILD_HOST": "pykvm",
              "KBUILD_BUILD_TIMESTAMP": "1970-01-01", "LC_ALL": "C"}


@dataclass(frozen=True)
class TestKernel:
    """The files of a built test kernel."""

    __test__ = False  # not a pytest test class, despite the name

    bzimage: Path  # arch/x86/boot/bzImage: boot protocol image, LZ4 payload
    vmlinux: Path  # the ELF kernel, with the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)
    config: Path  # the full .config it was built with
    release: str  # `uname -r`, e.g. "6.1.192-pykvm"


def fragment_bytes() -> bytes:
    """The config fragment shipped with the package."""
    return resources.files(__package__).joinpath(FRAGMENT_NAME).read_bytes()


_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Kconfig text -> ``{"CONFIG_X": "y" | "n" | "123" | '"str"'}`` (``is not set`` -> ``"n"``)."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _SET.match(line) or _UNSET.match(line)
        if m:
            options[m.group(1)] = m.group(2) if m.re is _SET else "n"
    return options


def unmet_options(fragment: str, config: str) -> list[str]:
    """Fragment options whose value did not make it into ``config``: ``["CONFIG_X=y (got n)"]``."""
    wanted = parse_config(fragment)
    got = parse_config(config)
    return [f"{k}={v} (got {got.get(k, 'n')})" for k, v in wanted.items() if got.get(k, "n") != v]


def _compiler_id() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise AssetError("gcc not found: run `apt-get install build-essential`") from None
    return out.splitlines()[0]


def _jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def source_tree(progress: Progress | None = None) -> Path:
    """The unpacked linux-source-6.1 tree (cached; installs the package if needed)."""
    progress = progress or Progress("linux-source")
    debian.ensure_host_packages([SOURCE_PACKAGE], "build the test kernel", progress)
    version = debian.installed_version(SOURCE_PACKAGE) or "?"
    if not SOURCE_TARBALL.is_file():
        raise AssetError(f"{SOURCE_TARBALL} missing: run `apt-get install --reinstall {SOURCE_PACKAGE}`")

    def build(tmp: Path) -> None:
        progress.say(f"unpacking {SOURCE_TARBALL.name} ({SOURCE_PACKAGE} {version})")
        _run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp)], "unpack the kernel source")

    entry = cached("linux-source", {"package": SOURCE_PACKAGE, "version": version}, build)
    trees = [p for p in entry.iterdir() if (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise AssetError(f"unexpected layout in {entry}: remove it and retry")
    return trees[0]


def _run(argv: list[str], what: str, *, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, **_BUILD_ENV})
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        raise AssetError(f"cannot {what}: `{' '.join(argv[:3])} ...` exited {proc.returncode}: "
                         f"{lines[-1].strip() if lines else 'no output'}")
    return proc.stdout


def _make(src: Path, out: Path, *targets: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(src), f"O={out}", f"ARCH={_ARCH}", f"-j{jobs}", *targets]


def configure(src: Path, out: Path, fragment: Path, progress: Progress) -> list[str]:
    """tinyconfig + fragment + olddefconfig into ``out/.config``; returns the unmet options."""
    progress.say("make tinyconfig + pykvm-6.1.config + olddefconfig")
    _run(_make(src, out, "tinyconfig"), "make tinyconfig")
    _run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(out), str(out / ".config"),
          str(fragment)], "merge the config fragment", cwd=src)
    _run(_make(src, out, "olddefconfig"), "make olddefconfig")
    unmet = unmet_options(fragment.read_text(), (out / ".config").read_text())
    if unmet:
        progress.say(f"warning: {len(unmet)} fragment option(s) not set after olddefconfig: "
                     + ", ".join(unmet))
    return unmet


def _build_bzimage(src: Path, out: Path, jobs: int, log_path: Path, progress: Progress) -> None:
    progress.say(f"make -j{jobs} bzImage (several minutes; progress every {REPORT_EVERY} files)")
    compiled = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_make(src, out, "bzImage", jobs=jobs), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, **_BUILD_ENV})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            word = line.split(None, 1)[0] if line.strip() else ""
            if word == "CC":
                compiled += 1
                if compiled % REPORT_EVERY == 0:
                    progress.say(f"{compiled} files compiled")
            elif word in ("LD", "OBJCOPY") and ("vmlinux" in line or "bzImage" in line):
                progress.say(line.strip())
        rc = proc.wait()
    if rc != 0:
        kept = cache_root() / "test-kernel" / "last-failed-build.log"
        shutil.copyfile(log_path, kept)
        lines = log_path.read_text().splitlines()
        errors = ([l.strip() for l in lines if "error:" in l] or
                  [l.strip() for l in lines if l.startswith("make") and "Error" in l])
        first = errors[0] if errors else f"make exited {rc}"
        raise AssetError(f"test kernel build failed: {first}; full log: {kept}")
    progress.say(f"{compiled} files compiled, bzImage ready")


def fragment_options(text: str) -> str:
    """The fragment's settings alone, one ``CONFIG_X=v`` a line, sorted: what the cache key covers.

    Comments and layout of the fragment can change without a 20-minute rebuild.
    """
    return "".join(f"{k}={v}\n" for k, v in sorted(parse_config(text).items()))


def _inputs() -> dict[str, str | bytes]:
    return {"source": debian.installed_version(SOURCE_PACKAGE) or "?",
            "fragment": fragment_options(fragment_bytes().decode()),
            "compiler": _compiler_id(), "arch": _ARCH, "recipe": RECIPE_VERSION}


def _result(entry: Path) -> TestKernel:
    info = json.loads((entry / "build.json").read_text())
    return TestKernel(bzimage=entry / "bzImage", vmlinux=entry / "vmlinux",
                      config=entry / "config", release=info["release"])


def test_kernel(*, build: bool = True, jobs: int | None = None,
                progress: Progress | None = None) -> TestKernel:
    """Build (once) and return the test kernel.

    With ``build=False`` only an already built kernel is returned, else
    :class:`AssetError` says how to build it: for test suites that would
    rather skip than spend minutes compiling.
    """
    progress = progress or Progress("test-kernel")
    # Fast path (two subprocesses): the inputs are all on the host and the entry exists.
    if debian.installed_version(SOURCE_PACKAGE) is not None and shutil.which("gcc"):
        entry = entry_dir("test-kernel", _inputs())
        if entry.is_dir():
            return _result(entry)
    if not build:
        raise AssetError("test kernel not built (or its inputs changed): "
                         "run `python -m pykvm.assets test-kernel`")
    debian.ensure_host_packages(BUILD_PACKAGES, "build the test kernel", progress)
    src = source_tree(progress)
    fragment = fragment_bytes()
    inputs = _inputs()
    jobs = jobs or _jobs()

    # The object tree lives beside the entry, not in the temporary entry
    # directory: an interrupted or failed build resumes where it stopped.
    out = entry_dir("test-kernel", inputs).with_name(f".build-{cache_key('test-kernel', inputs)}")

    def make_entry(tmp: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (tmp / FRAGMENT_NAME).write_bytes(fragment)
        unmet = configure(src, out, tmp / FRAGMENT_NAME, progress)
        started = time.monotonic()
        _build_bzimage(src, out, jobs, tmp / "build.log", progress)
        make_seconds = time.monotonic() - started
        release = _run(_make(src, out, "-s", "kernelrelease"), "ask the kernel release").strip()
        shutil.copyfile(out / "arch/x86/boot/bzImage", tmp / "bzImage")
        shutil.copyfile(out / "vmlinux", tmp / "vmlinux")
        shutil.copyfile(out / ".config", tmp / "config")
        shutil.copyfile(out / "System.map", tmp / "System.map")
        (tmp / "build.json").write_text(json.dumps({
            "release": release, "jobs": jobs, "make_seconds": round(make_seconds, 1),
            "bzimage_bytes": (tmp / "bzImage").stat().st_size,
            "vmlinux_bytes": (tmp / "vmlinux").stat().st_size, "unmet_options": unmet,
        }, indent=2) + "\n")
        progress.say(f"built {release}: make took {format_elapsed(make_seconds)}")

    result = _result(cached("test-kernel", inputs, make_entry))
    shutil.rmtree(out, ignore_errors=True)  # only once the entry is in place
    return result


test_kernel.__test__ = False  # type: ignore[attr-defined]  # not a pytest test either
