"""What is measured: the ops (with their loss settings), the cases (B, D, C, dtype, passes) and
the named grids (--smoke, --quick, the full grid, and the foundation issue's two targets).
"""

import dataclasses

import torch

PASSES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One benchmarked loss: the public function and the keyword arguments that make it."""
    name: str
    function: str           # "cosine_softmax" | "c_contrastive" | "c_triplet"
    kwargs: tuple           # ((key, value), ...): hashable, so OpSpec is a dict key
    describe: str

    @property
    def options(self):
        return dict(self.kwargs)


# The paper's settings with the usual face-recognition scale s = 30.
OPS = {
    "normface": OpSpec("normface", "cosine_softmax", (("scale", 30.0),),
                       "cosine_softmax(s=30)"),
    "arcface": OpSpec("arcface", "cosine_softmax", (("scale", 30.0), ("m2", 0.5)),
                      "cosine_softmax(s=30, m2=0.5)"),
    "cosface": OpSpec("cosface", "cosine_softmax", (("scale", 30.0), ("m3", 0.35)),
                      "cosine_softmax(s=30, m3=0.35)"),
    "c_contrastive": OpSpec("c_contrastive", "c_contrastive", (),
                            "c_contrastive(pos_margin=0, neg_margin=1)"),
    "c_triplet": OpSpec("c_triplet", "c_triplet", (),
                        "c_triplet(margin=0.8, hardest_only=True)"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape of one op. `time` / `memory` say which measurements it gets; `backends`, when
    set, restricts it to those backend names (the targets compare exactly cpu and reference)."""
    op: str
    B: int
    D: int
    C: int
    dtype: str = "float32"
    passes: tuple = PASSES
    time: bool = True
    memory: bool = True
    backends: tuple = ()
    tag: str = ""

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def key(self):
        return (self.op, self.B, self.D, self.C, self.dtype)


# The foundation issue's CPU performance check: fp32 ArcFace (m2=0.5, s=30), forward+backward.
#   time:   backend="cpu" no slower than the eager reference at B=256, D=128, C=50,000
#   memory: extra peak memory of "cpu" under 1/5 of the reference's at B=512, D=64, C=200,000
# cpu_chunked (the CUDA backend's chunked path on CPU) runs beside cpu for comparison.
TARGET_TIME = Case("arcface", 256, 128, 50_000, "float32", ("fwd_bwd",), time=True, memory=True,
                   backends=("reference", "cpu", "cpu_chunked", "gemm_floor"), tag="target-time")
TARGET_MEMORY = Case("arcface", 512, 64, 200_000, "float32", ("fwd_bwd",), time=False,
                     memory=True, backends=("reference", "cpu", "cpu_chunked"),
                     tag="target-memory")
TARGET_TIME_MAX_RATIO = 1.0     # cpu median / reference median
TARGET_MEMORY_MAX_RATIO = 0.2   # cpu extra peak / reference extra peak


# torch.compile of the reference on CPU costs an inductor C++ compile per op and shape (10-30 s on
# two cores), so the quick CPU grid compiles it for this one case only.
QUICK_CPU_COMPILE = (("arcface", 2048),)


def targets():
    return [TARGET_TIME, TARGET_MEMORY]


def _product(ops, Bs, Ds, Cs, dtypes, passes):
    return [Case(op, B, D, C, dtype, tuple(passes))
            for dtype in dtypes for B in Bs for D in Ds for op in ops for C in Cs]


def smoke_grid():
    """Tiny shapes for the test suite: a softmax op and an agent op, every pass, two C values."""
    return _product(["normface", "c_triplet"], [32], [16], [512, 2048], ["float32"], PASSES)


def quick_grid(device_type):
    """Small enough to finish in about a minute on the 2-core CPU machine (with the targets)."""
    if device_type == "cuda":
        return _product(list(OPS), [1024], [256], [16_384, 65_536, 262_144], ["bfloat16"], PASSES)
    # CPU: the eager reference costs ~0.2 s per full pass at C=8192, so every op gets the full
    # pass at two sizes and ArcFace (the target's op) also gets forward and backward alone.
    cases = _product([op for op in OPS if op != "arcface"], [256], [128], [2048, 8192],
                     ["float32"], ["fwd_bwd"])
    cases += _product(["arcface"], [256], [128], [2048, 8192], ["float32"], PASSES)
    return cases + targets()


def full_grid(device_type):
    if device_type == "cuda":
        return _product(list(OPS), [4096], [128, 512], [16_384, 65_536, 262_144, 1_048_576],
                        ["bfloat16", "float32"], PASSES)
    return _product(list(OPS), [256], [128], [2048, 8192, 32_768, 100_000], ["float32"],
                    PASSES) + targets()


def custom_grid(ops, Bs, Ds, Cs, dtypes, passes):
    return _product(ops, Bs, Ds, Cs, dtypes, passes)
