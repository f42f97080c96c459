"""What must import without the compiled KVM binding (pykvm._kvm_cffi): the typed exits, the exit
dispatch, and all of pykvm.pvm (its KVM side only calls methods of the vCPU it is given)."""

import subprocess
import sys

CHECK = """
import sys
sys.modules["pykvm._kvm_cffi"] = None          # any import of it now raises ImportError
from pykvm.kvm import exits as E
from pykvm import pvm
from pykvm.pvm import instructions, gaps, host
from pykvm.dispatch import handle_exit
assert pvm.complete_gap(None, E.InternalError(1, ())) is False
assert handle_exit(None, E.Shutdown()).reason == "shutdown"
assert "pykvm.kvm._lib" not in sys.modules, "the binding was loaded"
print("ok")
"""


def test_exits_dispatch_and_pvm_import_without_the_compiled_binding():
    p = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
