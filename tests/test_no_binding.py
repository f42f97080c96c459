"""What must import without the compiled KVM binding (pykvm._kvm_cffi): the typed exits, the exit
dispatch, and all of pykvm.pvm (its KVM side only calls methods of the vCPU it is given)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHECK = """
import sys
sys.modules["pykvm._kvm_cffi"] = None          # any import of it now raises ImportError
from pykvm.kvm import exits as E
from pykvm import pvm
from pykvm.pvm import instructions, gaps, host
from pykvm.dispatch import handle_exit
from pykvm.virtio import blk_fast           # the C path's Python half (pykvm/kvm/vblk.py is C's)
assert pvm.complete_gap(None, E.InternalError(1, ())) is False
assert handle_exit(None, E.Shutdown()).reason == "shutdown"
assert "pykvm.kvm._lib" not in sys.modules, "the binding was loaded"
print("ok")
"""


def test_exits_dispatch_and_pvm_import_without_the_compiled_binding():
    p = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def _imports(path):
    """Every module name a file imports, relative imports resolved against its package."""
    import ast
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)


def test_only_the_kvm_package_imports_the_compiled_module():
    """pykvm/kvm/ is the binding: nothing else in the package imports pykvm._kvm_cffi or the
    module that wraps it (pykvm.kvm._lib); the rest reaches C through kvm/'s classes."""
    native = {"pykvm._kvm_cffi", "pykvm.kvm._lib"}
    offenders = [f"{path.relative_to(ROOT)}: {name}"
                 for path in sorted((ROOT / "pykvm").rglob("*.py"))
                 if path.parent != ROOT / "pykvm" / "kvm"
                 for name in _imports(path) if name in native]
    assert not offenders, offenders
