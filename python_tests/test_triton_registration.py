"""The Triton ops register when Triton compiles (no TRITON_INTERPRET), on the oldest supported
torch/triton too: torch 2.11's triton_op infers each schema from the op's annotations, so they
must give exactly the schema of the C++ op of the same name.

Runs in a subprocess: the other Triton tests set TRITON_INTERPRET=1 for their own process.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

# Not imported here: importing triton before test_triton.py sets TRITON_INTERPRET=1 would break
# the interpreter for the whole session.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHECK = """
import torch, normface_kernels as nk
from normface_kernels import functional
assert nk.has_triton(), functional._triton_status()[1]
triton_ops = [n for n in dir(torch.ops.normface) if n.startswith("triton_")]
assert "triton_cosine_softmax_forward" in triton_ops, triton_ops
def schema(op):
    s = op.default._schema
    return ([(a.name, str(a.type), repr(a.default_value)) for a in s.arguments],
            [str(r.type) for r in s.returns])
twins = 0
for name in triton_ops:
    cpp = name[len("triton_"):]
    if hasattr(torch.ops.normface, cpp):
        twins += 1
        mine, theirs = schema(getattr(torch.ops.normface, name)), schema(
            getattr(torch.ops.normface, cpp))
        assert mine == theirs, f"{name}: {mine} != {cpp}: {theirs}"
print("registered", len(triton_ops), "triton ops,", twins, "with the C++ schema")
"""


def test_triton_ops_register_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "registered" in run.stdout
