"""Class-parallel NormFace losses across GPUs and machines (torch.distributed), Partial FC style.

When C reaches millions, W (C, D) no longer fits one GPU. ``ShardedNormFaceLoss`` splits the
classes into contiguous blocks, one per rank: rank r owns the agents of classes
[class_start, class_end) and nothing else. Each step:

    1. all-gather the features (B_r, D) and labels of every rank -> the global batch (B, D);
    2. run our kernels on (global batch) x (local agents) with class_start / num_classes, so
       the op sees a shard of W: a per-row partial result of B floats, never a (B, C_r) buffer;
    3. all-gather those per-row partials (a few (B,) vectors) and merge them exactly:
         softmax    lse_i  = logsumexp_r lse_ri          (the merge of partial max / sum-exp)
                    loss_i = loss_oi + lse_i - lse_oi    (o = the rank owning y_i: its local
                                                          loss is lse_oi - z_iy)
         c_contrastive, center:  loss_i = sum_r loss_ri
         c_triplet (hardest):    min_{k != y} d_ik = min_r (rank r's nearest wrong agent), ties
                                 going to the lowest rank, i.e. the lowest global class id
         c_triplet (all):        sum_r sum_{k in shard r, k != y} relu(margin + d_iy - d_ik),
                                 after d_iy is broadcast from its owner;
    4. return the loss of the global batch, identical on every rank.

Gradients. Every rank calls backward on the same (replicated) loss. The collectives are
autograd functions whose backward follows one rule -- a replicated value has the same full
gradient on every rank; a value used by one rank's partial computation gets only that rank's
part, and the parts are summed where they meet:
    gather_batch (features)  forward all-gather, backward reduce-scatter (sum of the parts);
    gather_replicated        forward all-gather, backward: this rank's slice of the gradient;
    copy_to_shards           forward identity,   backward all-reduce (for the learned scale and
                             for d_iy, which every shard uses).
So `local_features.grad` is d(global loss)/d(local features), `weight.grad` is d(global loss)/
d(weight shard) and `scale.grad` is the full d(global loss)/d(scale) on every rank: exactly the
gradients of the single-process NormFaceLoss on the full W (python_tests/test_distributed.py).
With the closed-form backward of the Triton ops (docs/kernels.md), rank r's feature gradient is
s a_i [(g_ri + e_ri) Ubar_ri + target term] from its own shard's U and R; the reduce-scatter of
the feature gradients is then exactly the merge of U (and the scale's all-reduce that of R)
across ranks, weighted by each rank's (g + e): no extra collective, and a sharded step costs the
GEMM-equivalents of a local one.

DDP: a DDP-wrapped backbone *averages* its gradients over ranks, so with exact feature gradients
the backbone would see 1/world_size of d(global loss)/d(theta). ``ddp_compensation=True``
multiplies the feature gradient by world_size (InsightFace Partial FC does the same) so the
backbone gets the exact gradient of the global loss after DDP's average. Never wrap the loss
module itself in DDP: its weight differs on every rank, and its scale is already kept identical.

Communication per step (R ranks, B global batch, D embedding size, T <= 4 terms): forward
all-gathers of R ints (batch sizes), B labels, B x D features and T x B partials; backward one
reduce-scatter of B x D and, for a learned scale, one all-reduce of a scalar. c_triplet with
hardest_only=False adds a forward all-gather and a backward all-reduce of B floats (d_iy).
Everything works with NCCL (CUDA tensors) and gloo (CPU tensors); nothing but torch.distributed
moves data.

Without an initialized process group the module runs as a single process (world size 1).

The package: collectives.py (the all-gather / reduce-scatter helpers and the autograd functions
above), sharded.py (ShardedNormFaceLoss, shard_range), memory.py (memory_per_rank and its
tables). The per-loss partials and merges of step 3 are the loss table's
(normface_kernels/losses.py), shared with NormFaceLoss.
"""

from .memory import OPTIMIZER_STATES, memory_per_rank, memory_table, print_memory_table
from .sharded import ShardedNormFaceLoss, shard_range

__all__ = ["OPTIMIZER_STATES", "ShardedNormFaceLoss", "shard_range", "memory_per_rank",
           "memory_table", "print_memory_table"]
