"""What each kernel of a cosine_softmax training step costs, from docs/kernels.md: the tables
scripts/gpu_profile.py measures kernels against, and the kernel filter of gpu_check's ncu stage.
Plain Python (no torch), so that gpu_check's dry run reads it anywhere."""

# cuBLAS(Lt) on Hopper (nvjet_*, sm90_xmma_gemm_*, cutlass::Kernel2<...>, the split-K reduction);
# on CPU the GEMM ops themselves.
GEMM_PATTERNS = ("nvjet", "gemm", "xmma", "cutlass", "sm90_", "Kernel2", "splitKreduce")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
GEMM_GROUP = "library GEMM"
# Per-step cost of each kernel (all its calls), docs/kernels.md "Cost of a training step (Triton,
# cosine_softmax)" and the chunked path's "HBM bytes per step"; matched by substring of the
# kernel name. name -> (GEMM-equivalents, one = 2 B C D flops; HBM bytes of p or None), p: B, C,
# D, e (input element bytes), ep (chunked P: e for 16-bit on CUDA, else 4), splits (the Triton
# forward's class splits, None if unknown: its U partials are then left out).
MODELS = {
    "_softmax_fwd_kernel": (2.0, lambda p: (p.C + p.B) * p.D * p.e  # W, f read; U partials out
                            + (p.splits or 0) * p.B * p.D * 4),
    "_softmax_merge_kernel": (0.0, lambda p: p.splits and (p.splits + 1) * p.B * p.D * 4),
    "_grad_weight_kernel": (2.03, lambda p: 2 * p.C * p.D * p.e),    # W read, grad W written
    "_row_norm_kernel": (0.0, lambda p: (p.B + p.C) * p.D * p.e),    # f and W, once per step
    "_row_grad_kernel": (0.0, lambda p: p.B * p.D * (3 * p.e + 4)),  # f, W_y, U -> grad f
    # chunked path: S and P are in chunk buffers sized to the L2, so this may be L2 traffic
    "softmax_forward_kernel": (0.0, lambda p: p.B * p.C * 4),             # reads S
    "softmax_backward_kernel": (0.0, lambda p: p.B * p.C * (4 + p.ep)),   # S in, P out
    "finish_rows_kernel": (0.0, lambda p: (p.C + p.B) * p.D * (4 + 2 * p.e)),  # V, W -> grad W
    "row_norms_kernel": (0.0, lambda p: 2 * (p.B + p.C) * p.D * p.e),    # in both passes
}
# Whole step (docs/kernels.md): Triton 4.03 GEMM-eq, "about 4 |W|" + U partials written and
# read; chunked 4 GEMM-eq, "C D (7e + 8)" with the chunk buffers in L2; reference: 3 GEMMs.
STEP_MODELS = {
    "triton": (4.03, lambda p: 4 * p.C * p.D * p.e + 2 * (p.splits or 0) * p.B * p.D * 4),
    "cuda": (4.0, lambda p: p.C * p.D * (7 * p.e + 8)),
    "reference": (3.0, None),
}
# Other launches of a step (ATen elementwise, reductions, copies; rough, +-30): the ATen ops of
# one step counted on fake CUDA tensors (triton) and on the CPU chunked path (cuda), torch 2.14.
ATEN_LAUNCHES = {"triton": 130, "cuda": 90}
NCU_REGEX = "|".join(GEMM_PATTERNS + tuple(MODELS))  # the modelled kernels, for --kernel-name
