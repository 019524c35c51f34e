"""Memory per rank of ShardedNormFaceLoss: the README's tables (``python -m
normface_kernels.distributed`` prints them)."""

import math

import torch

# Optimizer state per parameter element, in units of the parameter's size.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "lamb": 2, "sgd_momentum": 1, "sgd": 1,
                    "rmsprop": 1, "adagrad": 1, "sgd_no_momentum": 0, "none": 0}


def _dtype_bytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def memory_per_rank(num_classes, embedding_size, world_size, *, batch_size=128,
                    dtype=torch.float32, optimizer="adam", sample_rate=1.0, master_weights=False):
    """Bytes one rank needs for ShardedNormFaceLoss: a dict with the parts and the total.

    num_classes: C; embedding_size: D; world_size: ranks; batch_size: samples per rank (the
    global batch is batch_size * world_size); dtype: of the weight and its gradient;
    optimizer: key of OPTIMIZER_STATES ("adam"/"adamw": two states, "sgd" with momentum: one,
    "sgd_no_momentum": none), states kept in fp32 (and in dtype when dtype is float64);
    master_weights: an fp32 copy of a low-precision weight (mixed-precision optimizers).

    Parts: weight (the largest shard, ceil(C / R) rows), grad, optimizer (states and master
    copy), sampled (with sample_rate < 1: the gathered agents weight[index] and their gradient),
    workspace (the global batch: features, their gradient and a normalized fp32 copy, labels
    and the per-row partials; our kernels need no (B, C) buffer). Activations of the backbone
    and the CUDA context are not included.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if world_size <= 0 or num_classes < world_size:
        raise ValueError(f"need 0 < world_size <= num_classes, got {world_size}, {num_classes}")
    elem = _dtype_bytes(dtype)
    acc = max(4, elem)
    rows = -(-num_classes // world_size)
    shard = rows * embedding_size
    parts = {
        "weight": shard * elem,
        "grad": shard * elem,
        "optimizer": shard * acc * OPTIMIZER_STATES[optimizer]
                     + (shard * 4 if master_weights and elem < 4 else 0),
    }
    kept = rows if sample_rate >= 1.0 else max(1, math.ceil(sample_rate * rows))
    parts["sampled"] = 0 if sample_rate >= 1.0 else 2 * kept * embedding_size * elem
    batch = batch_size * world_size
    parts["workspace"] = (batch * embedding_size * (2 * elem + acc)   # f, grad f, normalized f
                          + batch * 8                                   # labels
                          + batch * acc * 4 * (world_size + 1))         # partials and merge
    parts["total"] = sum(parts.values())
    return parts


def memory_table(num_classes=(1_000_000, 10_000_000, 100_000_000), world_sizes=(8, 64), *,
                 embedding_size=512, **kwargs):
    """Rows (C, R, GiB of weight, grad, optimizer, sampled, workspace, total) of
    memory_per_rank; kwargs go to it (batch_size, dtype, optimizer, sample_rate, ...)."""
    rows = []
    for c in num_classes:
        for r in world_sizes:
            m = memory_per_rank(c, embedding_size, r, **kwargs)
            rows.append((c, r) + tuple(m[k] / 2 ** 30 for k in
                                       ("weight", "grad", "optimizer", "sampled", "workspace",
                                        "total")))
    return rows


def print_memory_table(num_classes=(1_000_000, 10_000_000, 100_000_000), world_sizes=(8, 64), *,
                       embedding_size=512, file=None, **kwargs):
    """Print memory_table as a Markdown table (GiB per rank)."""
    lines = ["| classes | GPUs | weight | grad | optimizer | sampled | workspace | total |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, r, *gib in memory_table(num_classes, world_sizes, embedding_size=embedding_size,
                                   **kwargs):
        cells = " | ".join(f"{v:.2f}" for v in gib)
        lines.append(f"| {c:,} | {r} | {cells} |")
    text = "\n".join(lines)
    print(text, file=file)
    return text


def main():
    """python -m normface_kernels.distributed: the README's two tables."""
    common = "fp32 weight, Adam (two fp32 states), 128 samples per GPU, D = 512; GiB per rank"
    print(f"All classes every step (sample_rate=1): {common}\n")
    print_memory_table()
    print(f"\nPartial FC, sample_rate=0.1: {common}; sampled = the kept agents and their "
          f"gradient\n")
    print_memory_table(sample_rate=0.1)
