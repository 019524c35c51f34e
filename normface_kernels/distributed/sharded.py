"""ShardedNormFaceLoss: NormFaceLoss with its classes sharded over the ranks (Partial FC).

What each loss computes on a shard and how the ranks' partials merge is the loss table's
(normface_kernels/losses.py, LOSS_TABLE); the collectives are collectives.py's.
"""

import math

import torch

from .. import backends, checks
from .. import functional as F
from ..losses import DEFAULTS, LOSS_TABLE, LossOptions, ShardStep
from ..modules import LossModule
from . import collectives


def shard_range(num_classes, world_size, rank):
    """[start, end) of the classes rank `rank` owns: contiguous, sizes differ by at most one.

    The first num_classes % world_size ranks get one class more (C need not divide evenly).
    """
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# Non-hardest C-triplet: agents per block are chosen so that a block has ~this many (B x block)
# distances; only one block lives at a time, forward and backward. Read at every step: set it
# here (normface_kernels.distributed.sharded.TRIPLET_BLOCK_ELEMS = n).
TRIPLET_BLOCK_ELEMS = 1 << 20


class ShardedNormFaceLoss(LossModule):
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
            a DDP-wrapped backbone (DDP averages over ranks; see the package docstring).
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

    def __init__(self, embedding_size, num_classes, *, group=None, loss=DEFAULTS.loss,
                 scale="learn", margins=DEFAULTS.margins, aux=DEFAULTS.aux,
                 aux_weight=DEFAULTS.aux_weight, lam=DEFAULTS.lam,
                 normalize_features=DEFAULTS.normalize_features,
                 normalize_weight=DEFAULTS.normalize_weight, pos_margin=DEFAULTS.pos_margin,
                 neg_margin=DEFAULTS.neg_margin, triplet_margin=DEFAULTS.triplet_margin,
                 hardest_only=DEFAULTS.hardest_only, center=DEFAULTS.center,
                 ignore_index=DEFAULTS.ignore_index, reduction=DEFAULTS.reduction,
                 backend=DEFAULTS.backend, distortion_momentum=DEFAULTS.distortion_momentum,
                 sample_rate=1.0, ddp_compensation=False, scale_init=None, scale_floor=None,
                 device=None, dtype=None):
        options = LossOptions.from_arguments(locals())  # the option keywords above
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if backend == "reference":
            raise ValueError("backend='reference' cannot compute a shard of the classes; use "
                             "'auto', 'cpu', 'cuda' or 'triton'")
        super().__init__(options)
        self.group = group
        self.rank, self.world_size = collectives.rank_and_world(group)
        self.check_sizes(embedding_size, num_classes)
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
        self.sample_rate = float(sample_rate)
        self.ddp_compensation = bool(ddp_compensation)
        self.last_sampled_classes = None  # global ids of the agents of the last sampled step

        # The scale, when learned, is replicated: the same initial value on every rank and the
        # same (all-reduced) gradient.
        self.init_agents(self.class_end - self.class_start, embedding_size, self.num_classes,
                         scale, device, dtype, scale_init=scale_init, scale_floor=scale_floor)

    # -- parameters ----------------------------------------------------------------------------

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
        if not collectives.is_distributed(self.group):
            return self.weight.detach().clone()
        sizes = [e - s for s, e in (shard_range(self.num_classes, self.world_size, r)
                                    for r in range(self.world_size))]
        return collectives.all_gather_rows(self.weight.detach(), sizes, self.group)

    @property
    def mean_distortion(self):
        """Mean over the classes seen so far (all ranks) of the moving average of d(f, W_y)^2
        (NaN before any training step).

        A collective when distributed: read it on every rank.
        """
        seen = self.distortion_seen
        stats = torch.stack([self.agent_distortion[seen].double().sum(),
                             seen.double().sum()])
        collectives.all_reduce_sum(stats, self.group)
        return float(stats[0] / stats[1]) if float(stats[1]) > 0 else math.nan

    # -- forward -------------------------------------------------------------------------------

    def _ops(self, device):
        """name -> torch.ops.normface.<name> (or its triton_ twin) for the backend of
        `device`."""
        backend = backends.resolve(self.backend, device)
        if backend.name == "reference":
            raise RuntimeError(f"ShardedNormFaceLoss needs compiled kernels for {device} tensors "
                               "(cpu, cuda or triton backend); none is available")
        return backend.op

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

    def _scale(self, features):
        s = checks.scale_tensor(self.effective_scale, features)
        return collectives.copy_to_shards(s, self.group) if s.requires_grad else s

    def forward(self, local_features, local_labels):
        labels = checks.check_inputs(local_features, self.weight, local_labels)
        op = self._ops(local_features.device)
        multiplier = float(self.world_size) if self.ddp_compensation else 1.0
        f_all, labels_all, _ = collectives.gather_batch(local_features, labels, self.group,
                                                        multiplier)
        valid = labels_all != self.ignore_index
        # Same data on every rank, so every rank raises together (never a hang). A data check:
        # skipped on CUDA tensors while switched off (no host sync in the step); a label out of
        # range then reads as a target in no shard.
        if checks.data_checks_on(labels_all):
            checks.check_labels_range(labels_all, self.num_classes, self.ignore_index)
        weight, op_labels, start, ncls = self._sample_shard(labels_all, valid)
        group = self.group
        step = ShardStep(
            options=self.options, op=op, features=f_all, weight=weight, labels=op_labels,
            shard=(self.ignore_index, start, ncls), valid=valid, labels_all=labels_all,
            class_starts=self._class_starts, scale=lambda: self._scale(f_all),
            gather=lambda x: collectives.gather_replicated(x, group),
            copy_to_shards=lambda x: collectives.copy_to_shards(x, group),
            triplet_block_elems=TRIPLET_BLOCK_ELEMS)

        # Every term's partials (T, B) in one all-gather: the main loss's, then the aux's.
        entries = [LOSS_TABLE[self.loss]] + ([] if self.aux is None else [LOSS_TABLE[self.aux]])
        terms, parts = [], []
        for entry in entries:
            partials, carry = entry.shard_terms(step)
            parts.append((entry, slice(len(terms), len(terms) + len(partials)), carry))
            terms += partials
        acc = checks.acc_dtype(f_all.dtype)
        merged = collectives.gather_replicated(torch.stack([t.to(acc) for t in terms]), group)

        zero = torch.zeros((), dtype=acc, device=f_all.device)
        losses = [F.reduce_loss(torch.where(valid, entry.shard_merge(merged[:, cols], step, carry),
                                            zero), labels_all, self.ignore_index, self.reduction)
                  for entry, cols, carry in parts]
        loss = losses[0] if self.aux is None else losses[0] + self.aux_weight * losses[1]
        if self.training and not torch.compiler.is_compiling():
            self._update_distortion(f_all, labels_all, self.class_start)
        return loss

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_end}) of rank {self.rank}/"
                f"{self.world_size}, loss={self.loss!r}, margins=({self.m1}, {self.m2}, "
                f"{self.m3}), aux={self.aux!r}, sample_rate={self.sample_rate}, "
                f"backend={self.backend!r}")
