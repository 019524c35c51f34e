"""The Triton ops register when Triton compiles (no TRITON_INTERPRET), on the oldest supported
torch/triton too, each with its schema in normface_kernels/schemas.py (torch 2.11's triton_op
infers the schema from the body's signature, which registration.py sets from that table).

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
from normface_kernels import schemas
nk.backends.load_triton()
def key(name, s):
    # What torch.library infers from a signature: no return names, int for SymInt.
    return ([(a.name, str(a.type), repr(a.default_value)) for a in s.arguments],
            [str(r.type) for r in s.returns])
for name, schema in schemas.TRITON.items():
    mine = getattr(torch.ops.normface, "triton_" + name).default._schema
    assert key(name, mine) == key(name, schemas.parse(name, schema)), (name, str(mine), schema)
print("registered", len(schemas.TRITON), "triton ops with the table's schemas")
"""


def test_triton_ops_register_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "registered" in run.stdout
