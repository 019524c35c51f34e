"""Block sizes, warps, stages and grid splits of every Triton kernel: functions of the input dtype
and D only, in one place (the ahead-of-time compile check enumerates them through the launchers).

Sizes were chosen by compiling for sm_90 with triton 3.6 and 3.8 (registers, spills and shared
memory from ptxas; docs/kernels.md "Tiles"). The binding constraint is the fp32 accumulator
that stays in registers for a whole loop: U (BLOCK_M x D) in the forward, grad W~ (BLOCK_N x D)
in the class-stationary backward. At 8 warps a thread holds BLOCK x D / 256 of it: 128 registers
at 64 x 512, which leaves just enough of the 255 for the rest. Under TRITON_INTERPRET=1 (CPU,
one program at a time) every block is 16 -- the smallest tl.dot accepts -- so that the tests'
tiny shapes cross tile and split boundaries.
"""

import functools
import os
from typing import NamedTuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programs the split grids aim for: a few waves per SM (B = 1024 is only 16 row tiles of 64,
# far too few for 132 SMs, so the class axis is split as well). A forward that accumulates U
# keeps a (splits, B, D) fp32 partial of it: 2 waves (17 splits, 34 MB at B = 1024, D = 512).
WAVES = 4
ACCUMULATOR_WAVES = 2
# Under the interpreter: enough programs to exercise the split merge on tiny shapes.
INTERPRET_PROGRAMS = 4
# Elements of a register accumulator per program (BLOCK x D_PAD), see the module docstring.
ACC_ELEMENTS = 64 * 512


class Blocks(NamedTuple):
    m: int          # rows of f per tile (BLOCK_M)
    n: int          # classes per tile (BLOCK_N)
    k: int          # D step of the cosine tile (CHUNK): d = whole rows on chip (16-bit)
    d: int          # D padded to a power of two (D_PAD)
    num_warps: int
    num_stages: int


def d_pad(dim):
    """D rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << max(0, int(dim) - 1).bit_length())


# Widest (padded) D on a GPU: a W tile of whole rows and the fp32 (rows, D) accumulator must
# fit on chip (shared memory and registers; docs/kernels.md "Tiles").
MAX_D = {torch.float16: 2048, torch.bfloat16: 2048, torch.float32: 1024, torch.float64: 512}


def check_dim(dtype, dim):
    """A clear error for a D the GPU tiles cannot hold (the interpreter takes any D)."""
    if not INTERPRET and d_pad(dim) > MAX_D[dtype]:
        raise ValueError(f"D = {dim} is larger than the Triton backend's largest D for {dtype} "
                         f"({MAX_D[dtype]}); use backend='cuda' or 'cpu'")


def _chunk(dtype, dp):
    """16-bit tiles hold whole rows (the tile of the stationary operand stays on chip); fp32 and
    fp64 tiles of whole rows do not fit in registers, so their cosine tile is summed over D
    chunks (tiles.cos_tile). The interpreter takes the chunked path for fp64 to test it."""
    if INTERPRET:
        return min(dp, 16) if dtype == torch.float64 else dp
    if dtype in (torch.float16, torch.bfloat16):
        return dp
    return min(dp, 32 if dtype == torch.float32 else 16)


def _tiles(dtype, dim):
    """(padded D, D chunk, the fixed Blocks or None): the part of every dense kernel's tile
    choice that does not depend on the kernel -- the interpreter's tiny tiles and float64's
    16 x 16 (served for gradcheck, not speed)."""
    check_dim(dtype, dim)
    dp = d_pad(dim)
    k = _chunk(dtype, dp)
    if INTERPRET:
        return dp, k, Blocks(16, 16, k, dp, 1, 1)
    if dtype == torch.float64:
        return dp, k, Blocks(16, 16, k, dp, 4 if dp <= 128 else 8, 1)
    return dp, k, None


def forward_blocks(dtype, dim, accumulate, w_unit=False):
    """Row-stationary forward (softmax and agent losses): a (BLOCK_M, D) tile of f stays on chip
    while (BLOCK_N, D) tiles of W stream through. `accumulate`: the (BLOCK_M, D) fp32 U (or V)
    accumulator is kept (a gradient is needed). `w_unit`: fp16 with normalized W, whose tile is
    also normalized in registers (docs/kernels.md "16-bit operands") and needs a narrower one.
    Shared memory: BLOCK_M D + stages BLOCK_N D 16-bit values, at most ~200 KB."""
    dp, k, fixed = _tiles(dtype, dim)
    if fixed is not None:
        return fixed
    if dtype == torch.float32:
        return Blocks(max(16, min(64, ACC_ELEMENTS // 4 // dp)), 16, k, dp,
                      4 if dp <= 128 else 8, 2 if dp <= 512 else 1)
    if dp > 512:  # 1024, 2048
        m = ACC_ELEMENTS // dp // (2 if w_unit else 1)
        return Blocks(max(16, m), 16, k, dp, 8, 2)
    if not accumulate:
        return Blocks(128 if dp <= 256 else 64, 64 if dp <= 256 else 32, k, dp, 8, 3)
    m = max(16, min(128, ACC_ELEMENTS // dp))
    n = 64 if dp <= 128 else 32
    if w_unit:
        n = 32 if dp <= 128 else 16
    return Blocks(m, n, k, dp, 8, 3)


def grad_weight_blocks(dtype, dim):
    """Class-stationary backward: a (BLOCK_N, D) tile of W and its fp32 grad W~ accumulator stay
    on chip while (BLOCK_M, D) tiles of f stream through. At 64 x 512 a BLOCK_M of 32 leaves
    ptxas 0-8 bytes short of registers (3.6 / 3.8); 16 leaves a margin."""
    dp, k, fixed = _tiles(dtype, dim)
    if fixed is not None:
        return fixed
    if dtype == torch.float32:
        return Blocks(16, max(16, min(64, ACC_ELEMENTS // 4 // dp)), k, dp,
                      4 if dp <= 128 else 8, 2 if dp <= 512 else 1)
    if dp <= 128:
        return Blocks(64, 128, k, dp, 8, 3)
    return Blocks(16, max(16, min(128, ACC_ELEMENTS // dp)), k, dp, 8, 2)


def row_blocks(dim):
    """Row-wise kernels over (B, D) or (C, D): rows per program and the D step."""
    return (16, 64) if not INTERPRET else (16, 16)


def dot_precision(dtype, device):
    """input_precision of tl.dot: fp32 inputs get TF32x3 (about fp32 accuracy; plain TF32 would
    put ~1e-3 relative errors into s * cos) on NVIDIA, IEEE elsewhere; 16-bit inputs ignore it."""
    if dtype == torch.float32 and device.type == "cuda" and not INTERPRET and not torch.version.hip:
        return "tf32x3"
    if dtype == torch.float64 or dtype == torch.float32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def sm_count(index):
    """The one query of the GPU the launchers make (the ahead-of-time check answers it as its
    target does): streaming multiprocessors of CUDA device `index`."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device, waves=WAVES):
    if INTERPRET or device.type != "cuda" or not torch.cuda.is_available():
        return INTERPRET_PROGRAMS
    return waves * sm_count(device.index if device.index is not None else 0)


def cdiv(a, b):
    return (a + b - 1) // b


def split_classes(n_row_tiles, n_class_tiles, device, accumulate=False):
    """(splits, tiles_per_split) so that row tiles x splits ~ target_programs, with no empty
    split: every split gets at least one class tile."""
    waves = ACCUMULATOR_WAVES if accumulate else WAVES
    want = max(1, cdiv(target_programs(device, waves), max(1, n_row_tiles)))
    splits = max(1, min(n_class_tiles, want))
    per_split = cdiv(n_class_tiles, splits)
    return cdiv(n_class_tiles, per_split), per_split
