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
    _gather_batch (features)  forward all-gather, backward reduce-scatter (sum of the parts);
    _GatherReplicated         forward all-gather, backward: this rank's slice of the gradient;
    _CopyToShards             forward identity,   backward all-reduce (for the learned scale and
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
hardest_only=False adds a forward all-gather and a backward all-reduce of B floats (d_iy). Everything works with NCCL (CUDA tensors) and gloo (CPU tensors); nothing but
torch.distributed moves data.

Without an initialized process group the module runs as a single process (world size 1).
"""

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import checks, functional as F
from .modules import (AUX_LOSSES, LOSSES, distortion_per_class, init_agents, reset_agents,
                      update_agent_distortion)
from .scale import scale_in_loss

EPS = 1e-12  # the eps of every norm (contract: sqrt(sum x^2 + eps))
# Non-hardest C-triplet: agents per block are chosen so that a block has ~this many (B x block)
# distances; only one block lives at a time, forward and backward.
TRIPLET_BLOCK_ELEMS = 1 << 20

__all__ = ["ShardedNormFaceLoss", "shard_range", "memory_per_rank", "memory_table",
           "print_memory_table"]


# ---------------------------------------------------------------------------------------------
# Process group helpers
# ---------------------------------------------------------------------------------------------

def _distributed(group):
    """True when collectives must run (an initialized group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _rank_and_world(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_range(num_classes, world_size, rank):
    """[start, end) of the classes rank `rank` owns: contiguous, sizes differ by at most one.

    The first num_classes % world_size ranks get one class more (C need not divide evenly).
    """
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# torch >= 2.14 names the flat collectives *_single; older releases *_into_tensor / *_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_reduce_scatter_unsupported = set()  # backends that raised: fall back to all-reduce


def _all_gather(x, group):
    """(R, *x.shape) stack of every rank's x (same shape everywhere), not differentiable."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))  # flat: gloo and NCCL
    _ALL_GATHER(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


def _reduce_scatter(x, group):
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


class _GatherPadded(torch.autograd.Function):
    """Forward: the concatenation of every rank's rows (sizes may differ); backward: the sum
    over ranks of the gradients of our rows (each rank used the global batch in its own partial
    computation), times `grad_multiplier` (DDP compensation)."""

    @staticmethod
    def forward(ctx, x, sizes, group, grad_multiplier):
        ctx.sizes, ctx.group, ctx.grad_multiplier = sizes, group, grad_multiplier
        bmax = max(sizes)
        if min(sizes) == bmax:  # equal local batches: no padding
            return _all_gather(x, group).flatten(0, 1)
        padded = x.new_zeros((bmax,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = _all_gather(padded, group)
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

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
        mine = _reduce_scatter(padded, ctx.group)[: sizes[dist.get_rank(ctx.group)]]
        if ctx.grad_multiplier != 1.0:
            mine = mine * ctx.grad_multiplier
        return mine, None, None, None


class _GatherReplicated(torch.autograd.Function):
    """Forward: all-gather (R, *x.shape); the result feeds a computation every rank repeats, so
    the incoming gradient is the same everywhere and our part of it is just our slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

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


def _gather_batch(features, labels, group, grad_multiplier=1.0):
    """Global batch: (features (B, D) differentiable, labels (B,), per-rank sizes)."""
    if not _distributed(group):
        return features, labels, [features.shape[0]]
    n = torch.tensor([features.shape[0]], dtype=torch.int64, device=features.device)
    sizes = [int(v) for v in _all_gather(n, group).flatten().tolist()]
    bmax = max(sizes)
    padded = labels.new_zeros((bmax,))
    padded[: labels.shape[0]] = labels
    gathered = _all_gather(padded, group)
    labels_all = torch.cat([gathered[r, :m] for r, m in enumerate(sizes)])
    features_all = _GatherPadded.apply(features, sizes, group, float(grad_multiplier))
    return features_all, labels_all, sizes


def _gather_replicated(x, group):
    return _GatherReplicated.apply(x, group) if _distributed(group) else x[None]


def _copy_to_shards(x, group):
    return _CopyToShards.apply(x, group) if _distributed(group) else x


# ---------------------------------------------------------------------------------------------
# Pieces of the agent losses computed in plain torch: B x D gathers and class-blocked sums
# ---------------------------------------------------------------------------------------------

def _normalize(x):
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + EPS)


def _row_distance(features, weight, index):
    """d_i = 2 - 2 cos(f_i, W_index[i]) for index >= 0, +inf where index < 0; (B,)."""
    acc = checks.acc_dtype(features.dtype)
    has = index >= 0
    w = weight.index_select(0, index.clamp(min=0)).to(acc)
    cos = (_normalize(features.to(acc)) * _normalize(w)).sum(dim=1)
    d = 2.0 - 2.0 * cos
    return torch.where(has, d, torch.full_like(d, math.inf))


def _triplet_block(f_n, w, d_y, target, offset, margin):
    """sum_{k in block, k != y} relu(margin + d_iy - d_ik) for one block of agents, (B,)."""
    d = 2.0 - 2.0 * (f_n @ _normalize(w.to(f_n.dtype)).t())
    hinge = torch.relu(margin + d_y[:, None] - d)
    cols = torch.arange(offset, offset + w.shape[0], device=w.device)
    hinge = torch.where(cols[None, :] == target[:, None], torch.zeros_like(hinge), hinge)
    return hinge.sum(dim=1)


def _triplet_all_sum(features, weight, d_y, target, margin):
    """This shard's part of the non-hardest C-triplet sum (target: local index or -1), (B,).

    No op takes d_iy from outside, so this is a torch loop over blocks of agents; each block is
    recomputed in the backward (checkpoint), keeping the extra memory at O(B x block).
    """
    acc = checks.acc_dtype(features.dtype)
    f_n = _normalize(features.to(acc))
    d_y = d_y.to(acc)
    block = max(1, TRIPLET_BLOCK_ELEMS // max(1, features.shape[0]))
    total = f_n.new_zeros(features.shape[0])
    for offset in range(0, weight.shape[0], block):
        w = weight[offset: offset + block]
        if weight.shape[0] <= block:
            part = _triplet_block(f_n, w, d_y, target, offset, margin)
        else:
            part = checkpoint(_triplet_block, f_n, w, d_y, target, offset, margin,
                              use_reentrant=False)
        total = total + part
    return total


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

class ShardedNormFaceLoss(nn.Module):
    """NormFaceLoss with its classes sharded over the ranks of a process group (Partial FC).

    Rank r owns ``weight`` of shape (class_end - class_start, D): the agents of the contiguous
    classes [class_start, class_end) (see ``shard_range``; C need not divide by the world size).

    Args:
        embedding_size, num_classes: D and the global C (every rank passes the same values).
        group: the torch.distributed process group (None: the default group). Without an
            initialized process group the module is a single process (world size 1).
        sample_rate: in (0, 1]. Below 1, each training step keeps only
            ceil(sample_rate * local classes) agents per rank: every class that is a label in
            the global batch plus random others (Partial FC). The loss is then the loss over
            the sampled classes (the full loss for sample_rate=1, and always in eval mode).
        ddp_compensation: multiply the gradient of the local features by the world size, for
            a DDP-wrapped backbone (DDP averages over ranks; see the module docstring).
        Every other keyword is NormFaceLoss's: loss, scale, margins, aux, aux_weight, lam,
        normalize_features, normalize_weight, pos_margin, neg_margin, triplet_margin,
        hardest_only, center, ignore_index, reduction, backend, distortion_momentum,
        scale_init, scale_floor, device, dtype. The learned scale's default floor comes from
        the global C, so it is the same on every rank. backend must have kernels (cpu, cuda,
        triton): "reference" has no shards.

    forward(local_features (B_r, D), local_labels (B_r,) global class ids) -> the loss of the
    global batch (every rank's samples; reduction="none" gives (B,) in rank order), the same
    value on every rank. Call it, and backward, on every rank: both run collectives. B_r may
    differ between ranks.
    """

    def __init__(self, embedding_size, num_classes, *, group=None, loss="softmax",
                 scale="learn", margins=(1.0, 0.0, 0.0), aux=None, aux_weight=0.01, lam=0.0,
                 normalize_features=True, normalize_weight=True, pos_margin=0.0,
                 neg_margin=1.0, triplet_margin=0.8, hardest_only=True, center=False,
                 ignore_index=-100, reduction="mean", backend="auto", distortion_momentum=0.99,
                 sample_rate=1.0, ddp_compensation=False, scale_init=None, scale_floor=None,
                 device=None, dtype=None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if aux not in AUX_LOSSES:
            raise ValueError(f"aux must be one of {AUX_LOSSES}, got {aux!r}")
        if len(margins) != 3:
            raise ValueError(f"margins must be (m1, m2, m3), got {margins!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0.0 <= distortion_momentum < 1.0:
            raise ValueError(f"distortion_momentum must be in [0, 1), got {distortion_momentum}")
        if backend == "reference":
            raise ValueError("backend='reference' cannot compute a shard of the classes; use "
                             "'auto', 'cpu', 'cuda' or 'triton'")
        checks.check_reduction(reduction)
        self.group = group
        self.rank, self.world_size = _rank_and_world(group)
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be > 0, got "
                             f"{embedding_size} and {num_classes}")
        if num_classes < self.world_size:
            raise ValueError(f"num_classes ({num_classes}) must be at least the world size "
                             f"({self.world_size}): every rank owns at least one class")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.class_start, self.class_end = shard_range(self.num_classes, self.world_size,
                                                       self.rank)
        # Class boundaries of every rank: owner of class y = bucketize(y, starts, right) - 1.
        self.register_buffer("_class_starts", torch.tensor(
            [shard_range(self.num_classes, self.world_size, r)[0]
             for r in range(self.world_size)], dtype=torch.int64, device=device),
            persistent=False)

        self.loss, self.aux, self.aux_weight = loss, aux, float(aux_weight)
        self.m1, self.m2, self.m3, self.lam = checks.check_margins(*margins, lam)
        self.normalize_features = bool(normalize_features)
        self.normalize_weight = bool(normalize_weight)
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.triplet_margin, self.hardest_only, self.center = (
            float(triplet_margin), bool(hardest_only), bool(center))
        self.ignore_index, self.reduction, self.backend = int(ignore_index), reduction, backend
        self.distortion_momentum = float(distortion_momentum)
        self.sample_rate = float(sample_rate)
        self.ddp_compensation = bool(ddp_compensation)
        self.last_sampled_classes = None  # global ids of the agents of the last sampled step

        # The scale, when learned, is replicated: the same initial value on every rank and the
        # same (all-reduced) gradient.
        init_agents(self, self.class_end - self.class_start, embedding_size, self.num_classes,
                    scale, device, dtype, scale_init=scale_init, scale_floor=scale_floor)
        self.reset_parameters()

    # -- parameters ----------------------------------------------------------------------------

    def reset_parameters(self):
        # The distribution of NormFaceLoss's init (fan_in = D is the same for a shard).
        reset_agents(self)

    @torch.no_grad()
    def load_full_weight(self, weight):
        """Copy this rank's rows [class_start, class_end) of a full (C, D) weight."""
        if tuple(weight.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(f"weight must be ({self.num_classes}, {self.embedding_size}), got "
                             f"{tuple(weight.shape)}")
        self.weight.copy_(weight[self.class_start: self.class_end])

    @torch.no_grad()
    def full_weight(self):
        """The full (C, D) weight on every rank (a collective): for export or re-sharding to
        another world size (`load_full_weight`). Needs C x D of memory on each rank."""
        if not _distributed(self.group):
            return self.weight.detach().clone()
        rows = -(-self.num_classes // self.world_size)
        padded = self.weight.new_zeros((rows, self.embedding_size))
        padded[: self.weight.shape[0]] = self.weight
        gathered = _all_gather(padded, self.group)
        return torch.cat([gathered[r, : e - s] for r, (s, e) in enumerate(
            shard_range(self.num_classes, self.world_size, k) for k in range(self.world_size))])

    @property
    def effective_scale(self):
        """The scale the loss uses: NormFaceLoss's (fixed, or max(learned, scale_floor))."""
        return scale_in_loss(self)

    @property
    def distortion_per_class(self):
        """(class_end - class_start,) float32: NormFaceLoss's per-class distortion for this
        rank's classes (NaN for a class not seen yet); no collective."""
        return distortion_per_class(self)

    @property
    def mean_distortion(self):
        """Mean over the classes seen so far (all ranks) of the moving average of d(f, W_y)^2
        (NaN before any training step).

        A collective when distributed: read it on every rank.
        """
        seen = self.distortion_seen
        stats = torch.stack([self.agent_distortion[seen].double().sum(),
                             seen.double().sum()])
        if _distributed(self.group):
            dist.all_reduce(stats, group=self.group)
        return float(stats[0] / stats[1]) if float(stats[1]) > 0 else math.nan

    # -- forward -------------------------------------------------------------------------------

    def _ops(self, device):
        """torch.ops.normface (or its triton_ twins) for the backend of `device`."""
        backend = F.resolve_backend(self.backend, device)
        if backend == "reference":
            raise RuntimeError(f"ShardedNormFaceLoss needs compiled kernels for {device} tensors "
                               "(cpu, cuda or triton backend); none is available")
        return lambda name: F._op(name, backend)

    def _sample_shard(self, labels_all, valid):
        """The agents this step uses: (weight (n, D), op labels, class_start, num_classes).

        Without sampling: the whole shard with global labels. With sampling: the kept agents
        weight[index], and labels renumbered for the op -- the position in index for a local
        target, one "elsewhere" id past the kept agents for a target on another rank.
        """
        start, end = self.class_start, self.class_end
        if self.sample_rate >= 1.0 or not self.training:
            self.last_sampled_classes = None
            return self.weight, labels_all, start, self.num_classes
        local = end - start
        is_local = valid & (labels_all >= start) & (labels_all < end)
        positives = torch.unique(labels_all[is_local] - start)
        keep = max(int(math.ceil(self.sample_rate * local)), positives.numel())
        if keep >= local:
            index = torch.arange(local, device=labels_all.device)
        else:
            priority = torch.rand(local, device=labels_all.device)
            priority[positives] = 2.0  # positives always kept
            index = torch.topk(priority, keep, sorted=False).indices.sort().values
        # The "elsewhere" id must not be ignore_index, or the op would drop those rows.
        elsewhere = index.numel() if self.ignore_index != index.numel() else index.numel() + 1
        position = torch.searchsorted(index, (labels_all - start).clamp(0, local - 1))
        op_labels = torch.where(is_local, position, torch.full_like(labels_all, elsewhere))
        op_labels = torch.where(valid, op_labels, labels_all)
        self.last_sampled_classes = index + start
        return self.weight[index], op_labels, 0, elsewhere + 1

    def forward(self, local_features, local_labels):
        labels = checks.check_inputs(local_features, self.weight, local_labels)
        op = self._ops(local_features.device)
        multiplier = float(self.world_size) if self.ddp_compensation else 1.0
        f_all, labels_all, _ = _gather_batch(local_features, labels, self.group, multiplier)
        valid = labels_all != self.ignore_index
        # Same data on every rank, so every rank raises together (never a hang). A data check:
        # skipped on CUDA tensors while switched off (no host sync in the step); a label out of
        # range then reads as a target in no shard.
        if checks.data_checks_on(labels_all):
            checks.check_labels_range(labels_all, self.num_classes, self.ignore_index)
        weight, op_labels, start, ncls = self._sample_shard(labels_all, valid)
        shard = (self.ignore_index, start, ncls)

        terms, d_y = self._local_terms(op, f_all, weight, op_labels, shard, valid)
        acc = checks.acc_dtype(f_all.dtype)
        merged = _gather_replicated(torch.stack([t.to(acc) for t in terms]), self.group)
        main = self._merge(merged, labels_all, valid, d_y)  # merged: (R, T, B)

        zero = torch.zeros((), dtype=acc, device=f_all.device)
        loss = F.reduce_loss(torch.where(valid, main, zero), labels_all, self.ignore_index,
                             self.reduction)
        if self.aux is not None:
            aux = torch.where(valid, merged[:, -1].sum(0), zero)
            loss = loss + self.aux_weight * F.reduce_loss(aux, labels_all, self.ignore_index,
                                                          self.reduction)
        if self.training and not torch.compiler.is_compiling():
            self._update_distortion(f_all, labels_all, valid)
        return loss

    def _local_terms(self, op, f_all, weight, op_labels, shard, valid):
        """This rank's (B,) partials, in the order _merge reads them (aux last), and d_iy for
        c_triplet with hardest_only=False (gathered in an extra round), else None."""
        d_y = None
        if self.loss == "softmax":
            s = checks.scale_tensor(self.effective_scale, f_all)
            if s.requires_grad:
                s = _copy_to_shards(s, self.group)
            loss_r, lse_r = op("cosine_softmax_forward")(
                f_all, weight, op_labels, s, self.m1, self.m2, self.m3, self.lam,
                self.normalize_features, self.normalize_weight, *shard)
            terms = [lse_r, loss_r]
        elif self.loss == "c_contrastive":
            terms = [op("c_contrastive")(f_all, weight, op_labels, self.pos_margin,
                                         self.neg_margin, *shard)]
        elif self.hardest_only:
            # The op finds this shard's nearest wrong agent; its distance is recomputed
            # differentiably from two rows (B x D), so no (B, C) tensor enters autograd.
            with torch.no_grad():
                _, hardest = op("c_triplet_forward")(f_all.detach(), weight.detach(), op_labels,
                                                     self.triplet_margin, True, False, *shard)
            terms = [_row_distance(f_all, weight, hardest),
                     op("center_loss")(f_all, weight, op_labels, *shard)]
        else:
            d_y = _gather_replicated(op("center_loss")(f_all, weight, op_labels, *shard),
                                     self.group).sum(0)
            target = op_labels - shard[1]
            target = torch.where(valid & (target >= 0) & (target < weight.shape[0]), target,
                                 torch.full_like(target, -1))
            terms = [_triplet_all_sum(f_all, weight, _copy_to_shards(d_y, self.group), target,
                                      self.triplet_margin)]
        if self.aux == "c_contrastive":
            terms.append(op("c_contrastive")(f_all, weight, op_labels, self.pos_margin,
                                             self.neg_margin, *shard))
        elif self.aux == "center":
            terms.append(op("center_loss")(f_all, weight, op_labels, *shard))
        return terms, d_y

    def _merge(self, merged, labels_all, valid, d_y):
        """Per-sample main loss of the global batch from every rank's partials (R, T, B)."""
        if self.loss == "softmax":
            # loss_i = loss_oi + (lse_i - lse_oi), o = the rank owning y_i.
            owner = torch.bucketize(labels_all, self._class_starts, right=True) - 1
            owner = torch.where(valid, owner, torch.zeros_like(owner))
            owner = owner.clamp(0, self.world_size - 1)[None]
            # Ignored rows are masked before the merge, so that their partials (NaN for NaN
            # features) send exactly 0, not 0 * NaN, back to the ops' lse (contract "Bad input").
            zero = torch.zeros((), dtype=merged.dtype, device=merged.device)
            lse_all = torch.where(valid[None], merged[:, 0], zero)
            loss_all = torch.where(valid[None], merged[:, 1], zero)
            lse = torch.logsumexp(lse_all, dim=0)
            return loss_all.gather(0, owner)[0] + (lse - lse_all.gather(0, owner)[0])
        if self.loss == "c_contrastive":
            return merged[:, 0].sum(0)
        if self.hardest_only:
            d_hard, d_y = merged[:, 0], merged[:, 1].sum(0)
            # argmin over ranks: first (lowest) rank on ties, i.e. the lowest class id; NaN wins
            # as in torch.argmin, so NaN propagates.
            d_min = d_hard.gather(0, d_hard.argmin(dim=0, keepdim=True))[0]
            main = torch.relu(self.triplet_margin + d_y - d_min)
        else:
            main = merged[:, 0].sum(0)
        return main + d_y if self.center else main

    @torch.no_grad()
    def _update_distortion(self, f_all, labels_all, valid):
        """Proposition 3's per-class moving average of d(f_i, W_y)^2, for this rank's classes."""
        start, end = self.class_start, self.class_end
        is_local = valid & (labels_all >= start) & (labels_all < end)
        y = torch.where(is_local, labels_all - start, -1)
        d = _row_distance(f_all.detach(), self.weight.detach(), y)
        update_agent_distortion(self, y, d, is_local)

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_end}) of rank {self.rank}/"
                f"{self.world_size}, loss={self.loss!r}, margins=({self.m1}, {self.m2}, "
                f"{self.m3}), aux={self.aux!r}, sample_rate={self.sample_rate}, "
                f"backend={self.backend!r}")


# ---------------------------------------------------------------------------------------------
# Memory calculator
# ---------------------------------------------------------------------------------------------

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


def _main():
    """python -m normface_kernels.distributed: the README's two tables."""
    common = "fp32 weight, Adam (two fp32 states), 128 samples per GPU, D = 512; GiB per rank"
    print(f"All classes every step (sample_rate=1): {common}\n")
    print_memory_table()
    print(f"\nPartial FC, sample_rate=0.1: {common}; sampled = the kept agents and their "
          f"gradient\n")
    print_memory_table(sample_rate=0.1)


if __name__ == "__main__":
    _main()
