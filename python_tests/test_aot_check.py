"""The ahead-of-time compile check (normface_kernels/triton/aot_check): it records every kernel
the launchers launch, and it fails on what it must fail on.

The full check (every configuration compiled for sm_90) runs in CI as `make aot-check`; here its
parts run on small inputs. Compiling needs a process without TRITON_INTERPRET (other test files
set it for their own process), so those parts run in a subprocess.
"""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

# Not imported here: importing triton before test_triton.py sets TRITON_INTERPRET=1 would break
# the interpreter for the whole session.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


_LAUNCHED_KERNELS = """
import sys, normface_kernels.triton
from triton.runtime.jit import JITFunction
names = {obj.__name__ for name, mod in list(sys.modules.items())
         if name.startswith("normface_kernels.triton") and mod is not None
         for obj in vars(mod).values()
         if isinstance(obj, JITFunction) and obj.__name__.endswith("_kernel")}
print(" ".join(sorted(names)))
"""


def test_records_every_kernel_of_the_triton_backend():
    """Every `*_kernel` Triton function of normface_kernels.triton is launched by some scenario
    at the realistic shapes (a kernel the check never sees is a kernel it never compiles)."""
    defined = _run("-c", _LAUNCHED_KERNELS)
    assert defined.returncode == 0, defined.stderr
    kernels = set(defined.stdout.split())
    assert kernels, "no Triton kernels found in normface_kernels.triton"
    listed = _run("-m", "normface_kernels.triton.aot_check", "--list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    recorded = {line.split()[0] for line in listed.stdout.splitlines() if line.startswith("_")}
    missing = kernels - recorded
    assert not missing, (f"kernels never launched by the AOT check's scenarios: {missing} "
                         "(launch them through tiles.launch from a public op, or add a scenario "
                         "in aot_check/record.py)")
    assert "unique configurations" in listed.stdout


def test_fails_on_compile_error_spills_and_shared_memory():
    run = _run(os.path.join("python_tests", "aot_toy_kernels.py"))
    assert run.returncode == 0, run.stdout + run.stderr
    found = {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert found["copy"]["problems"] == [] and not found["copy"]["error"]
    assert found["copy"]["regs"] > 0
    assert "power of 2" in found["error"]["error"]
    assert found["spill_fp16"]["spills"] > 0
    assert found["spill_fp16"]["problems"] == ["spills in a 16-bit kernel"]
    assert found["shared"]["shared"] > 227 * 1024
    assert any(p.startswith("shared") for p in found["shared"]["problems"])


def test_spills_fail_only_16_bit_kernels():
    from normface_kernels.triton.aot_check.compile import Result, problems
    from normface_kernels.triton.aot_check.record import TARGETS

    spilled = Result("sm90", regs=255, spill_stores=8, spill_loads=8, shared=1024)
    for dtype, fails in (("bf16", True), ("fp16", True), ("fp32", False), ("fp64", False)):
        config = SimpleNamespace(in_dtype=dtype, num_warps=4)
        assert bool(problems(spilled, config, TARGETS["sm90"])) == fails, dtype
    too_many = Result("sm90", regs=255, shared=0)
    assert problems(too_many, SimpleNamespace(in_dtype="fp32", num_warps=16), TARGETS["sm90"])


def test_backward_without_the_engine_matches_autograd():
    import normface_kernels as nk
    from normface_kernels.triton.aot_check.record import backward

    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 6, 1])
    loss = nk.cosine_softmax(f, w, y, s, m2=0.3, reduction="sum") * 2 + (f ** 2).sum()
    mine = {id(leaf): grad for leaf, grad in backward(loss)}
    for leaf, expected in zip((f, w, s), torch.autograd.grad(loss, (f, w, s))):
        torch.testing.assert_close(mine[id(leaf)], expected)


def test_gpu_queries_answer_as_the_target_for_our_code_only():
    from normface_kernels.triton.aot_check.record import TARGETS, as_target_gpu

    ours = {"__name__": "normface_kernels.triton.config", "torch": torch}
    query = "torch.cuda.get_device_properties(0).multi_processor_count"
    real = torch.cuda.is_available()
    with as_target_gpu(TARGETS["sm90"]):
        assert eval(query, ours) == 132
        assert eval("torch.cuda.is_available()", ours)
        assert torch.cuda.is_available() == real  # torch's own view (and the tests') unchanged
    assert torch.cuda.is_available() == real
