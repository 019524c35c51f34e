"""pytest-benchmark entries for the core ops, every backend that runs here (not part of the test
suite: `pytest bench/ --benchmark-only`; compare with --benchmark-compare, group by op and pass).

    pytest bench/ --benchmark-only                          # CPU, or the GPU when there is one
    NORMFACE_BENCH_SHAPE=1024,256,100000 pytest bench/ --benchmark-only -k arcface

The full side-by-side benchmark with the peers, memory, tables and plots is
`python -m normface_kernels.bench`; this file is for quick before/after comparisons of one kernel.
"""

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from normface_kernels.bench.grid import OPS, Case  # noqa: E402
from normface_kernels.bench.runners import (  # noqa: E402
    Inputs,
    make_runner,
    pass_steps,
    unavailable_reason,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_SHAPE = {"cpu": (256, 128, 8192, "float32"), "cuda": (4096, 512, 131_072, "bfloat16")}


def _shape():
    B, D, C, dtype = DEFAULT_SHAPE[DEVICE]
    if os.environ.get("NORMFACE_BENCH_SHAPE"):
        B, D, C = (int(v) for v in os.environ["NORMFACE_BENCH_SHAPE"].split(","))
    return B, D, C, os.environ.get("NORMFACE_BENCH_DTYPE", dtype)


@pytest.mark.parametrize("pass_name", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda", "gemm_floor"])
@pytest.mark.parametrize("op", list(OPS))
def test_op(benchmark, op, backend, pass_name):
    why = unavailable_reason(backend, DEVICE)
    if why is not None:
        pytest.skip(why)
    B, D, C, dtype = _shape()
    case = Case(op, B, D, C, dtype)
    runner = make_runner(backend, op, Inputs.make(case, DEVICE))
    setup, timed = pass_steps(runner, pass_name)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run(state):
        timed(state)
        sync()

    benchmark.group = f"{op} {pass_name} B={B} D={D} C={C} {dtype} {DEVICE}"
    benchmark.extra_info.update(B=B, D=D, C=C, dtype=dtype, device=DEVICE, backend=backend)
    benchmark.pedantic(run, setup=lambda: ((setup(),), {}), rounds=10 if DEVICE == "cpu" else 50,
                       warmup_rounds=1)
