"""ShardedNormFaceLoss on 2 and 3 gloo processes against the single-process NormFaceLoss.

Every contract setting, float64, C = 11 (divisible by neither 2 nor 3), ignored samples, unequal
local batches (one rank with none): the global loss and the gradients of each rank's local
features, weight shard and learned scale must equal the single-process ones on the full W.
One spawn per world size runs every setting, to keep the suite fast.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normface_kernels
from normface_kernels import NormFaceLoss
from normface_kernels import distributed as nkd

pytestmark = pytest.mark.skipif(normface_kernels._cpp_error is not None,
                                reason=f"normface_kernels._C did not load: "
                                       f"{normface_kernels._cpp_error}")

C, D = 11, 6
RTOL, ATOL = 1e-9, 1e-11
# Local batch sizes per world size: unequal, and one rank without samples.
SIZES = {2: [5, 4], 3: [4, 0, 6]}

# (name, ShardedNormFaceLoss / NormFaceLoss keywords, extras)
SETTINGS = [
    ("normface_learned_scale", dict(), {}),
    ("cosface", dict(scale=16.0, margins=(1.0, 0.0, 0.35)), {}),
    ("arcface_learned", dict(margins=(1.0, 0.5, 0.0)), {}),
    ("sphereface_lam", dict(scale=8.0, margins=(4.0, 0.0, 0.0), lam=1.5), {}),
    ("a_softmax_weight_only", dict(margins=(2.0, 0.0, 0.0), normalize_features=False), {}),
    ("l_softmax", dict(scale=1.0, margins=(2.0, 0.0, 0.0), normalize_features=False,
                       normalize_weight=False), {}),
    ("plain_softmax", dict(scale=1.0, normalize_features=False, normalize_weight=False), {}),
    ("l2_softmax_features_only", dict(normalize_weight=False), {}),
    ("combined_margins_aux_contrastive_sum",
     dict(margins=(1.5, 0.2, 0.1), aux="c_contrastive", aux_weight=0.5, reduction="sum"), {}),
    ("softmax_aux_center_none", dict(aux="center", aux_weight=0.25, reduction="none"), {}),
    ("ignore_index_minus_one", dict(ignore_index=-1, margins=(1.0, 0.3, 0.0)), {}),
    ("c_contrastive", dict(loss="c_contrastive", pos_margin=0.1, neg_margin=1.3), {}),
    ("c_triplet_hardest", dict(loss="c_triplet", triplet_margin=0.8), {}),
    ("c_triplet_hardest_center_aux", dict(loss="c_triplet", center=True, aux="c_contrastive"),
     {}),
    ("c_triplet_hardest_tie_across_shards", dict(loss="c_triplet", triplet_margin=1.5),
     {"tie": True}),
    ("c_triplet_all_center", dict(loss="c_triplet", hardest_only=False, center=True,
                                  triplet_margin=1.2), {}),
    ("c_triplet_all_blocked", dict(loss="c_triplet", hardest_only=False, triplet_margin=1.2,
                                   reduction="none"), {"block_elems": 8}),
    ("ddp_compensation", dict(margins=(1.0, 0.0, 0.2)), {"ddp": True}),
    # float32 end to end (float32 partials, float32 learned scale), at float32 tolerance.
    ("float32_arcface_aux_contrastive", dict(margins=(1.0, 0.5, 0.0), aux="c_contrastive"),
     {"dtype": torch.float32}),
    ("float32_c_triplet_hardest_center", dict(loss="c_triplet", center=True),
     {"dtype": torch.float32}),
    ("float32_c_triplet_all", dict(loss="c_triplet", hardest_only=False),
     {"dtype": torch.float32}),
]
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5


def _data(sizes, ignore_index, seed, tie=False):
    """The global batch (identical on every rank) and the full W."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    f = torch.randn(b, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (b,), generator=g)
    y[1] = ignore_index
    y[b - 2] = ignore_index
    y[0], y[b - 1] = 0, C - 1  # targets in the first and the last shard
    if tie:
        # Agents 2 and 9 (different shards) are the same axis vector e_0, so every cosine with
        # them is exact in any summation order: exact ties, which go to the lowest class id
        # (2). Sample 0 sits next to them, so they are its hardest negatives.
        w[2] = w[9] = torch.eye(D, dtype=torch.float64)[0]
        f[0, 0] = 5.0
    return f, w, y


def _double_scale(module):
    """A float64 learned scale, so its gradient is compared in float64 too."""
    if isinstance(module.scale, torch.nn.Parameter):
        module.scale = torch.nn.Parameter(module.scale.detach().double())
    return module


def _run_setting(rank, world, name, kw, extra, seed, sizes, backend="cpu"):
    """Compare one setting (the sharded loss on `backend`, the single process on cpu); returns a
    list of mismatch messages."""
    ignore_index = kw.get("ignore_index", -100)
    dtype = extra.get("dtype", torch.float64)
    rtol, atol = (RTOL, ATOL) if dtype == torch.float64 else (FLOAT32_RTOL, FLOAT32_ATOL)
    f, w, y = _data(sizes, ignore_index, seed, tie=extra.get("tie", False))
    f, w = f.to(dtype), w.to(dtype)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    single = NormFaceLoss(D, C, backend="cpu", dtype=dtype, **kw)
    sharded = nkd.ShardedNormFaceLoss(D, C, backend=backend, dtype=dtype,
                                      ddp_compensation=extra.get("ddp", False), **kw)
    if dtype == torch.float64:
        single, sharded = _double_scale(single), _double_scale(sharded)
    with torch.no_grad():
        single.weight.copy_(w)
    sharded.load_full_weight(w)
    f_single = f.clone().requires_grad_(True)
    loss_single = single(f_single, y)

    f_local = f[lo:hi].clone()
    if extra.get("nan_ignored") and lo <= 1 < hi:
        f_local[1 - lo] = float("nan")  # sample 1 is ignored (_data): it must change nothing
    f_local.requires_grad_(True)
    old_block = nkd.sharded.TRIPLET_BLOCK_ELEMS
    nkd.sharded.TRIPLET_BLOCK_ELEMS = extra.get("block_elems", old_block)
    try:
        loss = sharded(f_local, y[lo:hi])
    finally:
        nkd.sharded.TRIPLET_BLOCK_ELEMS = old_block

    cotangent = torch.linspace(0.5, 1.5, loss_single.numel(), dtype=loss_single.dtype)
    (loss_single * cotangent.view_as(loss_single)).sum().backward()
    (loss * cotangent.view_as(loss)).sum().backward()

    errors = []

    def check(what, got, want):
        if got is None or want is None:
            if (got is None) != (want is None):
                errors.append(f"[{name} rank {rank}/{world}] {what}: {got} vs {want}")
            return
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            diff = (got - want).abs().max().item()
            errors.append(f"[{name} rank {rank}/{world}] {what}: max diff {diff:.3g}\n"
                          f"  got  {got.flatten()[:8].tolist()}\n"
                          f"  want {want.flatten()[:8].tolist()}")

    multiplier = world if extra.get("ddp", False) else 1
    s0, s1 = sharded.class_start, sharded.class_end
    check("loss", loss.detach(), loss_single.detach())
    check("full_weight", sharded.full_weight(), w)
    check("grad features", f_local.grad, multiplier * f_single.grad[lo:hi])
    check("grad weight", sharded.weight.grad, single.weight.grad[s0:s1])
    if isinstance(single.scale, torch.nn.Parameter):
        check("grad scale", sharded.scale.grad, single.scale.grad)
    # A float32 diagnostic (agent_distortion is a float32 buffer): float32 tolerance.
    distortion = (sharded.mean_distortion, single.mean_distortion)
    if abs(distortion[0] - distortion[1]) > 1e-6 * max(1.0, abs(distortion[1])):
        errors.append(f"[{name} rank {rank}/{world}] mean distortion: {distortion}")
    return errors


def _run_sampling(rank, world, seed):
    """sample_rate < 1: the loss over the union of kept agents, positives always kept."""
    sizes = SIZES[world]
    f, w, y = _data(sizes, -100, seed)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    torch.manual_seed(100 + rank)  # ranks sample independently
    sharded = _double_scale(nkd.ShardedNormFaceLoss(
        D, C, backend="cpu", dtype=torch.float64, sample_rate=0.4, margins=(1.0, 0.4, 0.0),
        aux="c_contrastive"))
    sharded.load_full_weight(w)
    f_local = f[lo:hi].clone().requires_grad_(True)
    loss = sharded(f_local, y[lo:hi])
    loss.backward()
    kept = [None] * world
    dist.all_gather_object(kept, sharded.last_sampled_classes.tolist())
    union = torch.tensor(sorted(c for part in kept for c in part))

    errors = []
    valid = y[y != -100]
    if not bool(torch.isin(valid, union).all()):
        errors.append(f"[sampling rank {rank}] positives dropped: {valid} not in {union}")
    if union.numel() >= C:
        errors.append(f"[sampling rank {rank}] nothing sampled out: {union}")
    # The single-process loss on the kept agents, labels renumbered.
    single = _double_scale(NormFaceLoss(D, union.numel(), backend="cpu", dtype=torch.float64,
                                        margins=(1.0, 0.4, 0.0), aux="c_contrastive"))
    with torch.no_grad():
        single.weight.copy_(w[union])
    y_sub = torch.where(y == -100, y, torch.searchsorted(union, y.clamp(min=0)))
    f_single = f.clone().requires_grad_(True)
    loss_single = single(f_single, y_sub)
    loss_single.backward()
    want_w = torch.zeros_like(w)
    want_w[union] = single.weight.grad
    for what, got, want in (("loss", loss.detach(), loss_single.detach()),
                            ("grad features", f_local.grad, f_single.grad[lo:hi]),
                            ("grad weight", sharded.weight.grad,
                             want_w[sharded.class_start: sharded.class_end]),
                            ("grad scale", sharded.scale.grad, single.scale.grad)):
        if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            errors.append(f"[sampling rank {rank}/{world}] {what}: {got} vs {want}")
    # Eval mode: no sampling, the full loss.
    sharded.eval()
    full = NormFaceLoss(D, C, backend="cpu", dtype=torch.float64, margins=(1.0, 0.4, 0.0),
                        aux="c_contrastive")
    with torch.no_grad():
        full.weight.copy_(w)
        got, want = sharded(f[lo:hi], y[lo:hi]), full(f, y)
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        errors.append(f"[sampling eval rank {rank}/{world}] {got} vs {want}")
    return errors


def _in_group(rank, world, init_file, result_dir, body):
    """A spawned rank: joins the gloo group, runs body(rank, world) -> errors, writes them to
    rank<r>.txt (an exception is reported there too), and leaves without interpreter teardown."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    errors = []
    try:
        errors += body(rank, world)
    except Exception:  # report, and still reach destroy_process_group
        errors.append(traceback.format_exc())
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as out:
            out.write("\n".join(errors))
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
        dist.destroy_process_group()
        # The results are on disk. Leave without interpreter teardown: with torch 2.14, a gloo
        # process sometimes aborts in static destructors at exit ("terminate called without an
        # active exception") after a clean destroy_process_group, failing an otherwise green run.
        os._exit(0)


def _spawn(worker, world):
    """Runs worker on `world` ranks; returns every rank's report (empty: no error)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "rendezvous"), tmp), nprocs=world,
                 join=True)
        reports = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.txt")) as result:
                reports.append(result.read())
    return reports


def _cpu_checks(rank, world):
    errors = []
    for i, (name, kw, extra) in enumerate(SETTINGS):
        errors += _run_setting(rank, world, name, kw, extra, seed=i, sizes=SIZES[world])
    # Equal local batches take the no-padding path of the gather.
    errors += _run_setting(rank, world, "equal_local_batches", dict(aux="center"), {},
                           seed=99, sizes=[3] * world)
    errors += _run_sampling(rank, world, seed=123)
    # A label outside [0, C) raises the same ValueError on every rank (no hang).
    sharded = nkd.ShardedNormFaceLoss(D, C, backend="cpu", dtype=torch.float64)
    bad = torch.full((SIZES[world][rank],), C if rank == world - 1 else 0)
    try:
        sharded(torch.randn(SIZES[world][rank], D, dtype=torch.float64), bad)
        errors.append(f"[bad label rank {rank}] no error")
    except ValueError as error:
        if "labels" not in str(error):
            errors.append(f"[bad label rank {rank}] message: {error}")
    return errors


def _worker(rank, world, init_file, result_dir):
    _in_group(rank, world, init_file, result_dir, _cpu_checks)


# The Triton backend's shards (its closed-form backward merged by the collectives), run in the
# Triton interpreter on CPU tensors: a subset of SETTINGS that covers every loss and mode.
TRITON_SETTINGS = ("normface_learned_scale", "arcface_learned", "l_softmax",
                   "a_softmax_weight_only", "softmax_aux_center_none", "c_contrastive",
                   "c_triplet_hardest_center_aux", "c_triplet_all_center")


def _triton_checks(rank, world):
    if not normface_kernels.has_triton():
        return ["SKIP " + normface_kernels.backends.REGISTRY["triton"].unavailable_reason()]
    errors = []
    for i, (name, kw, extra) in enumerate(SETTINGS):
        if name in TRITON_SETTINGS:
            errors += _run_setting(rank, world, name, kw, extra, seed=i, sizes=SIZES[world],
                                   backend="triton")
    errors += _run_setting(rank, world, "nan_in_ignored_row",
                           dict(margins=(1.0, 0.3, 0.0), aux="c_contrastive"),
                           {"nan_ignored": True}, seed=7, sizes=SIZES[world], backend="triton")
    return errors


def _triton_worker(rank, world, init_file, result_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before normface_kernels.triton is imported
    _in_group(rank, world, init_file, result_dir, _triton_checks)


def test_sharded_triton_equals_single_process():
    pytest.importorskip("triton", reason="the triton package is not installed")
    reports = _spawn(_triton_worker, 2)
    for text in reports:
        if text.startswith("SKIP"):
            pytest.skip(text)
    report = [text for text in reports if text]
    assert not report, "\n".join(report)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(world):
    report = [text for text in _spawn(_worker, world) if text]
    assert not report, "\n".join(report)


# ---------------------------------------------------------------------------------------------
# Single process (no process group): world size 1, and the helpers
# ---------------------------------------------------------------------------------------------

def test_single_process_is_world_one():
    torch.manual_seed(0)
    f = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (7,))
    sharded = nkd.ShardedNormFaceLoss(D, C, backend="cpu", dtype=torch.float64, aux="center")
    single = NormFaceLoss(D, C, backend="cpu", dtype=torch.float64, aux="center")
    with torch.no_grad():
        single.weight.copy_(sharded.weight)
    assert (sharded.rank, sharded.world_size, sharded.class_start, sharded.class_end) == (
        0, 1, 0, C)
    got, want = sharded(f, y), single(f, y)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    g1 = torch.autograd.grad(got, (f, sharded.weight))
    g2 = torch.autograd.grad(want, (f, single.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_shard_range_covers_classes():
    for c, r in ((11, 2), (11, 3), (7, 7), (1_000_003, 64)):
        ranges = [nkd.shard_range(c, r, k) for k in range(r)]
        assert ranges[0][0] == 0 and ranges[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_rate"):
        nkd.ShardedNormFaceLoss(D, C, sample_rate=0.0)
    with pytest.raises(ValueError, match="reference"):
        nkd.ShardedNormFaceLoss(D, C, backend="reference")
    with pytest.raises(ValueError, match="loss"):
        nkd.ShardedNormFaceLoss(D, C, loss="arcface")
    with pytest.raises(ValueError, match="optimizer"):
        nkd.memory_per_rank(10, 4, 2, optimizer="adagrad2")


def test_memory_per_rank():
    m = nkd.memory_per_rank(1_000_000, 512, 8, batch_size=128, optimizer="adam")
    shard_bytes = 125_000 * 512 * 4
    assert m["weight"] == m["grad"] == shard_bytes
    assert m["optimizer"] == 2 * shard_bytes
    assert m["sampled"] == 0
    assert m["total"] == sum(v for k, v in m.items() if k != "total")
    sgd = nkd.memory_per_rank(1_000_000, 512, 8, optimizer="sgd")
    assert sgd["optimizer"] == shard_bytes
    sampled = nkd.memory_per_rank(1_000_000, 512, 8, sample_rate=0.1)
    assert sampled["sampled"] == 2 * 12_500 * 512 * 4
    # Uneven shards: the largest one counts.
    assert nkd.memory_per_rank(9, 2, 2, dtype=torch.float64)["weight"] == 5 * 2 * 8
    text = nkd.print_memory_table(file=open(os.devnull, "w"))
    assert "100,000,000" in text and text.count("\n") == 7
