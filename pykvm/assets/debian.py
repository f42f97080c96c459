"""Debian packages through Debian's own tools: apt-get, apt-cache, dpkg-deb.

Two uses:

* **fetching** a package without installing it (``apt-get download`` then
  ``dpkg-deb -x``), for the guest-side assets: ``busybox-static`` and the
  cloud kernel. ``linux-image-cloud-amd64`` is a metapackage; its single
  ``Depends:`` names the real image package (``linux-image-6.1.0-NN-cloud-amd64``),
  which is what gets downloaded.
* **installing** what the host needs to build the test kernel
  (:func:`ensure_host_packages`), with ``apt-get install -y`` when running as
  root, and otherwise a one-line error giving the exact command.

If apt's package lists do not know a package yet (a fresh machine where
``apt-get update`` never ran), ``apt-get update`` runs once, then the lookup
is retried. Every failure becomes an :class:`AssetError` naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .cache import cache_root
from .errors import AssetError
from .progress import Progress

_NONINTERACTIVE = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
_updated = False  # apt-get update runs at most once per process


def _run(argv: list[str], *, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise AssetError(f"{argv[0]} not found: pykvm's default assets need a Debian-based host with apt")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **_NONINTERACTIVE})
    if check and proc.returncode != 0:
        raise AssetError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {_last_line(proc)}")
    return proc


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _is_root() -> bool:
    return os.geteuid() == 0


def apt_update(progress: Progress | None = None) -> None:
    """``apt-get update``, once per process (needs root)."""
    global _updated
    if _updated:
        return
    if not _is_root():
        raise AssetError("apt's package lists need refreshing: run `sudo apt-get update` and retry")
    if progress:
        progress.say("apt-get update")
    proc = _run(["apt-get", "update", "-q"], check=False)
    if proc.returncode != 0:
        raise AssetError(f"`apt-get update` failed: {_last_line(proc)}; check the network and apt sources")
    _updated = True


def _show(name: str) -> str:
    """``apt-cache show`` of the candidate version, or ``""`` if apt does not know the package."""
    proc = _run(["apt-cache", "show", "--no-all-versions", name], check=False)
    return proc.stdout if proc.returncode == 0 else ""


def _field(stanza: str, field: str) -> str | None:
    m = re.search(rf"^{field}: (.*)$", stanza, re.MULTILINE)
    return m.group(1).strip() if m else None


# apt-cache takes a second or two per question; asking it on every call would
# make "cheap when cached" untrue. Answers are remembered in the cache root
# for RESOLVE_TTL seconds (and for the life of the process), so a new Debian
# upload is picked up within a week, and never in the middle of a test run.
RESOLVE_TTL = 7 * 24 * 3600
_resolved: dict[str, str] = {}


def _resolutions_file() -> Path:
    return cache_root() / "apt-resolved.json"


def _remembered(question: str) -> str | None:
    if question in _resolved:
        return _resolved[question]
    try:
        answers = json.loads(_resolutions_file().read_text())
        answer = answers[question]
        if time.time() - answer["time"] < RESOLVE_TTL:
            _resolved[question] = answer["value"]
            return answer["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remember(question: str, value: str) -> None:
    _resolved[question] = value
    path = _resolutions_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            answers = json.loads(path.read_text())
        except (OSError, ValueError):
            answers = {}
        answers[question] = {"value": value, "time": int(time.time())}
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # remembering is an optimisation only


def forget_resolutions() -> None:
    """Ask apt again next time (``python -m pykvm.assets --refresh``)."""
    _resolved.clear()
    try:
        _resolutions_file().unlink()
    except FileNotFoundError:
        pass


def candidate(name: str, progress: Progress | None = None) -> str:
    """The version ``apt-get download NAME`` would fetch (runs ``apt-get update`` if apt lacks NAME).

    Remembered for :data:`RESOLVE_TTL`; see :func:`forget_resolutions`.
    """
    version = _remembered(f"version:{name}")
    if version is None:
        version = _candidate(name, progress)
        _remember(f"version:{name}", version)
    return version


def _candidate(name: str, progress: Progress | None) -> str:
    stanza = _show(name)
    if not stanza:
        apt_update(progress)
        stanza = _show(name)
    version = _field(stanza, "Version") if stanza else None
    if not version:
        raise AssetError(f"Debian package {name} is unknown to apt; check /etc/apt/sources.list (bookworm main)")
    return version


def resolve_metapackage(name: str, progress: Progress | None = None) -> tuple[str, str]:
    """``linux-image-cloud-amd64`` -> ``("linux-image-6.1.0-NN-cloud-amd64", "6.1.xxx-y")``.

    Reads the first ``Depends:`` of the metapackage's candidate version; a
    package that is not a metapackage (no ``linux-image-*`` dependency) is
    returned as itself. Remembered like :func:`candidate`.
    """
    real = _remembered(f"depends:{name}")
    if real is None:
        candidate(name, progress)  # makes sure apt knows it
        real = name
        depends = _field(_show(name), "Depends") or ""
        for alternative in re.split(r"[,|]", depends):
            m = re.match(r"\s*(linux-image-[\w.+-]+)", alternative)
            if m:
                real = m.group(1)
                break
        _remember(f"depends:{name}", real)
    return real, candidate(real, progress)


def installed_version(name: str) -> str | None:
    """The installed version of a package, or None."""
    proc = _run(["dpkg-query", "-W", "-f", "${Status}|${Version}", name], check=False)
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.partition("|")
    return version if status.endswith(" installed") else None


def missing_packages(names: list[str]) -> list[str]:
    """Those of ``names`` that are not installed (one dpkg-query for all)."""
    if not names:
        return []
    proc = _run(["dpkg-query", "-W", "-f", "${Package}|${Status}\n", *names], check=False)
    installed = {pkg for pkg, _, status in (line.partition("|") for line in proc.stdout.splitlines())
                 if status.endswith(" installed")}
    return [n for n in names if n.split(":")[0] not in installed]


def download(name: str, version: str, dest: Path, progress: Progress | None = None) -> Path:
    """``apt-get download NAME=VERSION`` into ``dest``; returns the ``.deb``."""
    dest.mkdir(parents=True, exist_ok=True)
    # apt drops to the _apt user to download; let it write here (else it warns and falls back to root).
    dest.chmod(0o777)
    if progress:
        progress.say(f"downloading {name} {version}")
    for attempt in (1, 2):
        proc = _run(["apt-get", "download", "-q", f"{name}={version}"], cwd=dest, check=False)
        debs = sorted(dest.glob(f"{name}_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0]
        if attempt == 1 and not _updated and _is_root():
            apt_update(progress)  # stale package lists: the archive may have moved on
            continue
    # The archive may have dropped a version remembered from an earlier run: ask apt afresh next time.
    forget_resolutions()
    raise AssetError(f"cannot download Debian package {name}={version}: {_last_line(proc)}; "
                     "check the network and apt sources, then retry")


def extract(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` (no root needed, nothing installed); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def fetch(name: str, version: str, dest: Path, progress: Progress | None = None) -> Path:
    """Download and unpack one package into ``dest`` (the .deb is not kept)."""
    with tempfile.TemporaryDirectory(prefix="pykvm-deb-") as tmp:
        deb = download(name, version, Path(tmp), progress)
        if progress:
            progress.say(f"unpacking {deb.name}")
        return extract(deb, dest)


def ensure_host_packages(names: list[str], why: str, progress: Progress | None = None) -> None:
    """Make sure Debian packages are installed on the host, installing them as root.

    ``why`` completes "needed to ...", for the messages.
    """
    missing = missing_packages(names)
    if not missing:
        return
    command = "apt-get install -y --no-install-recommends " + " ".join(missing)
    if not _is_root():
        raise AssetError(f"packages needed to {why} are missing: run `sudo {command}`")
    if progress:
        progress.say(f"installing host packages needed to {why}: {' '.join(missing)}")
    for n in missing:
        candidate(n, progress)  # runs apt-get update if the lists lack one
    proc = _run(command.split(), check=False)
    if proc.returncode != 0:
        raise AssetError(f"`{command}` failed: {_last_line(proc)}")
