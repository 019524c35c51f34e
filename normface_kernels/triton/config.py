"""Block sizes and grid shapes of the Triton kernels, in one place.

On a GPU the tiles are sized for tensor cores (16-bit inputs) or TF32x3 (fp32 inputs); under
TRITON_INTERPRET=1 (CPU, one program at a time) every block is 16 -- the smallest tl.dot accepts
-- so that the tests' tiny shapes still cross tile, split and D-chunk boundaries.
"""

import functools
import os
from typing import NamedTuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programs the split grids aim for: a few waves per SM (B = 1024 alone is 8-16 row tiles, far too
# few for 132 SMs, so the class axis is split as well).
WAVES = 4
# Under the interpreter: enough programs to exercise the split merge on tiny shapes.
INTERPRET_PROGRAMS = 4
# Largest D chunk of the backward accumulators ((BLOCK_N, D_CHUNK) fp32 in registers). A D that
# fits one chunk lets the grad_W kernel apply eq. 4 in its epilogue.
MAX_D_CHUNK = 256
INTERPRET_D_CHUNK = 32

# Gradient filtering (ml-cross-entropy's idea): a backward tile whose |dL/dcos| sums to at most
# this is skipped before its two products. None = off (the default: exact, branch-free).
# 0.0 skips only all-zero tiles (exact: e.g. ignored rows); a small positive value trades
# exactness for speed. Set with normface_kernels.triton.set_grad_filter().
GRAD_FILTER = None


class Blocks(NamedTuple):
    m: int          # rows of f per tile (BLOCK_M)
    n: int          # classes per tile (BLOCK_N)
    k: int          # D step of the cosine dot (BLOCK_K)
    d: int          # D chunk of the backward accumulators (D_CHUNK)
    num_warps: int
    num_stages: int


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def forward_blocks(dtype):
    """Tiles of the forward (online logsumexp / agent reductions / logits)."""
    if INTERPRET:
        return Blocks(16, 16, 16, 16, 1, 1)
    if dtype in (torch.float16, torch.bfloat16):
        return Blocks(128, 128, 64, 64, 8, 3)
    if dtype == torch.float32:
        return Blocks(64, 128, 32, 32, 8, 3)
    return Blocks(32, 32, 16, 16, 4, 2)  # float64: FMA dots


def backward_blocks(dtype, dim):
    """Tiles of the backward: a (BLOCK_M, BLOCK_N) recomputed tile plus a D-chunk accumulator."""
    if INTERPRET:
        return Blocks(16, 16, 16, INTERPRET_D_CHUNK, 1, 1)
    if dtype == torch.float64:
        return Blocks(32, 32, 16, min(max(_next_pow2(dim), 16), 64), 4, 2)
    chunk = min(max(_next_pow2(dim), 16), MAX_D_CHUNK)
    k = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return Blocks(64, 64, k, chunk, 8 if chunk > 64 else 4, 2)


def dot_precision(dtype, device):
    """input_precision of tl.dot: fp32 inputs get TF32x3 (about fp32 accuracy; plain TF32 would
    put ~1e-3 relative errors into s * cos) on NVIDIA, IEEE elsewhere; 16-bit inputs ignore it."""
    if dtype == torch.float32 and device.type == "cuda" and not INTERPRET and not torch.version.hip:
        return "tf32x3"
    if dtype == torch.float64 or dtype == torch.float32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device):
    if INTERPRET or device.type != "cuda" or not torch.cuda.is_available():
        return INTERPRET_PROGRAMS
    return WAVES * _sm_count(device.index if device.index is not None else 0)


def cdiv(a, b):
    return (a + b - 1) // b


def split_classes(n_row_tiles, n_class_tiles, other, device):
    """(splits, tiles_per_split) so that row tiles x splits x other ~ target_programs, with no
    empty split: every split gets at least one class tile."""
    want = max(1, cdiv(target_programs(device), max(1, n_row_tiles * other)))
    splits = max(1, min(n_class_tiles, want))
    per_split = cdiv(n_class_tiles, splits)
    return cdiv(n_class_tiles, per_split), per_split
