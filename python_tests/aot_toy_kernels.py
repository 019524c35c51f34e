"""Toy Triton kernels with known resource problems, compiled by test_aot_check.py in a process
without TRITON_INTERPRET: prints one JSON line per kernel with what the AOT check found."""

import json
import sys

import torch
import triton
import triton.language as tl

from normface_kernels.triton.aot_check.compile import compile_one, unique_configs
from normface_kernels.triton.aot_check.record import TARGETS, Launch, TensorArg


@triton.jit
def _copy_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def _row_softmax_kernel(x_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) tile live across two reductions: one warp cannot hold 128 x 64 of it in
    registers."""
    idx = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    y = tl.load(x_ptr + idx).to(tl.float32)
    z = tl.exp(y - tl.max(y, 1)[:, None])
    tl.store(out_ptr + idx, (z / tl.sum(z, 1)[:, None]).to(out_ptr.dtype.element_ty))


@triton.jit
def _deep_pipeline_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """A dot whose pipelined operand tiles need more shared memory than one block may have."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc)


def main():
    h, f = TensorArg(torch.float16, 0), TensorArg(torch.float32, 0)
    cases = {
        "copy": Launch(_copy_kernel, (h, h), dict(BLOCK=1024, num_warps=4), "toy fp16 D=0"),
        "error": Launch(_copy_kernel, (h, h), dict(BLOCK=1000, num_warps=4), "toy fp16 D=0"),
        "spill_fp16": Launch(_row_softmax_kernel, (h, h), dict(ROWS=128, COLS=64, num_warps=1),
                             "toy fp16 D=0"),
        "shared": Launch(_deep_pipeline_kernel, (h, h, f, 4096),
                         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=6),
                         "toy fp16 D=0"),
    }
    target = TARGETS[sys.argv[1] if len(sys.argv) > 1 else "sm90"]
    for name, launch in cases.items():
        (config,) = unique_configs([launch], target)
        result = compile_one(config, target)
        print(json.dumps(dict(name=name, in_dtype=config.in_dtype, regs=result.regs,
                              spills=result.spill_stores + result.spill_loads,
                              shared=result.shared, error=result.error,
                              problems=result.problems)), flush=True)


if __name__ == "__main__":
    main()
