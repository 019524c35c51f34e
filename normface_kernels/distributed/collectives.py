"""The collectives of the sharded loss: process-group helpers, flat all-gather / reduce-scatter,
and the autograd functions whose backward follows one rule (normface_kernels/distributed
docstring, "Gradients"):

    gather_batch (features)  forward all-gather, backward reduce-scatter (sum of the parts);
    gather_replicated        forward all-gather, backward: this rank's slice of the gradient;
    copy_to_shards           forward identity,   backward all-reduce.

Each is the identity (or a stack of one) without an initialized group of more than one rank.
"""

import torch
import torch.distributed as dist


def is_distributed(group):
    """True when collectives must run (an initialized group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group):
    """(rank, world size) in `group`; (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


# torch >= 2.14 names the flat collectives *_single; older releases *_into_tensor / *_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_reduce_scatter_unsupported = set()  # backends that raised: fall back to all-reduce


def all_gather(x, group):
    """(R, *x.shape) stack of every rank's x (same shape everywhere), not differentiable."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))  # flat: gloo and NCCL
    _ALL_GATHER(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


def reduce_scatter(x, group):
    """Sum over ranks of x (R, *S), returning this rank's slice (*S)."""
    backend = dist.get_backend(group)
    x = x.contiguous()
    if backend not in _reduce_scatter_unsupported:
        out = x.new_empty(x.shape[1:])
        try:
            _REDUCE_SCATTER(out, x.view((-1,) + tuple(x.shape[2:])), group=group)
            return out
        except RuntimeError:  # older gloo: raised locally on every rank, before any transfer
            _reduce_scatter_unsupported.add(backend)
    x = x.clone()  # all-reduce moves twice the bytes of a reduce-scatter; keep our slice
    dist.all_reduce(x, group=group)
    return x[dist.get_rank(group)]


def all_gather_rows(x, sizes, group):
    """The concatenation of every rank's rows of x (rank r has sizes[r] rows), by a padded
    all-gather; not differentiable."""
    bmax = max(sizes)
    if min(sizes) == bmax:  # equal sizes: no padding
        return all_gather(x, group).flatten(0, 1)
    padded = x.new_zeros((bmax,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather(padded, group)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


class _GatherPadded(torch.autograd.Function):
    """Forward: the concatenation of every rank's rows (sizes may differ); backward: the sum
    over ranks of the gradients of our rows (each rank used the global batch in its own partial
    computation), times `grad_multiplier` (DDP compensation)."""

    @staticmethod
    def forward(ctx, x, sizes, group, grad_multiplier):
        ctx.sizes, ctx.group, ctx.grad_multiplier = sizes, group, grad_multiplier
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, bmax = ctx.sizes, max(ctx.sizes)
        if min(sizes) == bmax:
            padded = grad.reshape((len(sizes), bmax) + tuple(grad.shape[1:]))
        else:
            padded = grad.new_zeros((len(sizes), bmax) + tuple(grad.shape[1:]))
            offset = 0
            for r, n in enumerate(sizes):
                padded[r, :n] = grad[offset: offset + n]
                offset += n
        mine = reduce_scatter(padded, ctx.group)[: sizes[dist.get_rank(ctx.group)]]
        if ctx.grad_multiplier != 1.0:
            mine = mine * ctx.grad_multiplier
        return mine, None, None, None


class _GatherReplicated(torch.autograd.Function):
    """Forward: all-gather (R, *x.shape); the result feeds a computation every rank repeats, so
    the incoming gradient is the same everywhere and our part of it is just our slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[dist.get_rank(ctx.group)].contiguous(), None


class _CopyToShards(torch.autograd.Function):
    """Forward: identity on a replicated value that each rank uses in its partial computation;
    backward: the sum of the ranks' partial gradients (all-reduce), the same on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_batch(features, labels, group, grad_multiplier=1.0):
    """Global batch: (features (B, D) differentiable, labels (B,), per-rank sizes)."""
    if not is_distributed(group):
        return features, labels, [features.shape[0]]
    n = torch.tensor([features.shape[0]], dtype=torch.int64, device=features.device)
    sizes = [int(v) for v in all_gather(n, group).flatten().tolist()]
    labels_all = all_gather_rows(labels, sizes, group)
    features_all = _GatherPadded.apply(features, sizes, group, float(grad_multiplier))
    return features_all, labels_all, sizes


def gather_replicated(x, group):
    """(R, *x.shape): every rank's x, for a computation every rank repeats (see above)."""
    return _GatherReplicated.apply(x, group) if is_distributed(group) else x[None]


def copy_to_shards(x, group):
    """x, whose gradient is summed over the ranks (see above)."""
    return _CopyToShards.apply(x, group) if is_distributed(group) else x


def all_reduce_sum(x, group):
    """x summed over the ranks, in place (x itself without a group); not differentiable."""
    if is_distributed(group):
        dist.all_reduce(x, group=group)
    return x
