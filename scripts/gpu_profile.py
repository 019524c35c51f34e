"""Where a cosine_softmax training step spends its time, kernel by kernel, against this machine's
ceilings (bench/results/NOTES.md): each hot kernel's TFLOP/s and GB/s, as % of a bf16 8192^3
matmul and of a device-to-device copy measured here, and what limits it.

    python3 scripts/gpu_profile.py [--out DIR]    # GPU: triton, cuda; bf16 B=1024 D=512 C=2^20
    python3 scripts/gpu_profile.py --device cpu   # smoke test: cpu, reference, small shapes
    ncu --profile-from-start off --kernel-name regex:'<printed>' -o DIR/step \\
        python3 scripts/gpu_profile.py --ncu      # one bare step per backend

Per backend: a warm-up step (Triton compiles), one step under torch.profiler (kernels grouped by
name, cuBLAS's as one "library GEMM" group with 2 M N K of the recorded aten::mm calls), the
median step time over --reps and that of the three bare GEMMs. Cost models: docs/kernels.md.
`KEY ` lines feed gpu_check's summary; --out DIR writes DIR/profile.csv (ceilings: backend
"ceiling"). Exit 2 without a GPU (unless --device cpu), 1 if a measurement failed.
"""

import argparse
import csv
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from kernel_costs import (  # noqa: E402
    ATEN_LAUNCHES,
    GEMM_GROUP,
    GEMM_OPS,
    GEMM_PATTERNS,
    MODELS,
    NCU_REGEX,
    STEP_MODELS,
)

LATENCY_US = 20.0  # per call: shorter kernels may be bound by launch and tail latency
TOP = 12           # kernels per printed table (profile.csv has all)
COLUMNS = ("backend", "kernel", "calls", "total_ms", "share", "model_flops", "model_bytes",
           "tflops", "gbs", "pct_matmul_ceiling", "pct_copy_ceiling", "limiter")


def say(*args):
    print(*args, flush=True)


def short_name(name):
    """A demangled CUDA kernel signature's bare function name (template instances merged)."""
    if not name.startswith("void "):
        return name
    bare = re.split(r"[<(]", name[5:].replace("(anonymous namespace)::", ""), maxsplit=1)[0]
    return bare.rsplit("::", 1)[-1].strip()


def classify(name):
    """A kernel's (or CPU op's) group: its MODELS key, GEMM_GROUP, or its short name."""
    key = next((k for k in MODELS if k in name), None)
    if key is None and (name in GEMM_OPS or any(g in name for g in GEMM_PATTERNS)):
        key = GEMM_GROUP
    return key or short_name(name)


def limiter(pct_matmul, pct_copy, us_per_call):
    """compute / memory: the ceiling the kernel is closer to; latency: a short kernel far from
    both (a 12 us GEMM at 90% of the matmul ceiling is still compute-bound)."""
    top = max(pct_matmul or 0, pct_copy or 0)
    if us_per_call is not None and us_per_call < LATENCY_US and top < 50:
        return "latency"
    if pct_matmul is None and pct_copy is None:
        return ""
    return "compute" if (pct_matmul or 0) > (pct_copy or 0) else "memory"


def problem(B, C, D, dtype, device, splits=None):
    e = torch.empty((), dtype=dtype).element_size()
    return SimpleNamespace(B=B, C=C, D=D, e=e, ep=e if device.type == "cuda" and e == 2 else 4,
                           splits=splits)


def triton_splits(B, C, D, dtype, device):
    """The Triton forward's class splits, as its launcher picks them (cosine_softmax_fwd.py)."""
    try:
        from normface_kernels.triton import config
        blk = config.forward_blocks(dtype, D, True, dtype == torch.float16)
        return config.split_classes(config.cdiv(B, blk.m), config.cdiv(C, blk.n), device,
                                    accumulate=True)[0]
    except Exception:  # noqa: BLE001 - e.g. no triton: the U partials stay out of the model
        return None


def event_us(evt):
    """A device event's microseconds on torch 2.11 to 2.14+: device_time_total (0 when the
    profiler had no use_device), else the deprecated cuda_time_total, else its time range."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
    span = getattr(evt, "time_range", None)
    return float(us or (span.elapsed_us() if span is not None else 0))


def profile_items(events, on_gpu):
    """(name, us) per call: device activities (kernels, memcpy, memset) on a GPU; on CPU every
    op's self CPU time (self times add up to the step, as kernel times do)."""
    from torch.autograd import DeviceType
    if on_gpu:
        return [(e.name, event_us(e)) for e in events
                if getattr(e, "device_type", None) == DeviceType.CUDA]
    return [(e.name, float(e.self_cpu_time_total)) for e in events
            if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU
            and not getattr(e, "is_async", False)]


def mm_flops(name, shapes):
    """2 M N K (times the batch) of a GEMM op from its recorded input shapes; 0 if unknown."""
    shapes = [list(s) if isinstance(s, (list, tuple)) else [] for s in (shapes or [])]
    pair = shapes[1:3] if name.startswith("aten::addmm") else shapes[:2]  # addmm: bias first
    if len(pair) < 2 or len(pair[0]) not in (2, 3) or len(pair[0]) != len(pair[1]) \
            or pair[0][-1] != pair[1][-2]:
        return 0
    (*batch, m, k), n = pair[0], pair[1][-1]
    return 2 * (batch[0] if batch else 1) * m * k * n


def gemm_flops(events):
    """Flops of the profile's GEMM ops (record_shapes=True), skipping one called by another."""
    total = 0
    for e in events:
        parent, nested = getattr(e, "cpu_parent", None), False
        while e.name in GEMM_OPS and parent is not None and not nested:
            nested, parent = parent.name in GEMM_OPS, getattr(parent, "cpu_parent", None)
        if e.name in GEMM_OPS and not nested:
            total += mm_flops(e.name, getattr(e, "input_shapes", None))
    return total


def rates(flops, nbytes, us, ceiling):
    """(TFLOP/s, GB/s, % of the matmul ceiling, % of the copy ceiling); None where unknown."""
    tflops = flops / us / 1e6 if flops and us > 0 else None
    gbs = nbytes / us / 1e3 if nbytes and us > 0 else None
    pm = 100 * tflops / ceiling.tflops if tflops is not None and ceiling else None
    pc = 100 * gbs / ceiling.gbs if gbs is not None and ceiling else None
    return tflops, gbs, pm, pc


def kernel_rows(backend, items, p, events, ceiling):
    """One row (COLUMNS) per kernel group, longest first; share of the summed kernel time."""
    groups = {}
    for name, us in items:
        g = groups.setdefault(classify(name), [0, 0.0])
        g[0], g[1] = g[0] + 1, g[1] + us
    busy, rows = sum(us for _, us in groups.values()), []
    for key, (calls, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        gemm_eq, nbytes = MODELS.get(key, (0.0, lambda p: None))
        flops = gemm_flops(events) if key == GEMM_GROUP else gemm_eq * 2 * p.B * p.C * p.D
        tflops, gbs, pm, pc = rates(flops, nbytes(p), us, ceiling)
        rows.append(dict(backend=backend, kernel=key, calls=calls, total_ms=us / 1e3,
                         share=us / busy if busy else None, model_flops=flops or None,
                         model_bytes=nbytes(p) or None, tflops=tflops, gbs=gbs,
                         pct_matmul_ceiling=pm, pct_copy_ceiling=pc,
                         limiter=limiter(pm, pc, us / calls)))
    return rows


def num(x, unit=""):
    if x is None:
        return "-"
    return (f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}") + unit


def pct(share):
    return "-" if share is None else f"{100 * share:.1f}%"


def rate_text(row):
    if row["tflops"] is not None:
        return f"{num(row['tflops'])} TFLOP/s ({num(row['pct_matmul_ceiling'], '%')})"
    if row["gbs"] is not None:
        return f"{num(row['gbs'])} GB/s ({num(row['pct_copy_ceiling'], '%')})"
    return f"{num(row['total_ms'] * 1e3 / row['calls'])} us/call"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timings(fn, device, reps, warmup=1):
    """Milliseconds of each of `reps` calls: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    pairs = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def measure_ceilings(device):
    """Matmul TFLOP/s and copy GB/s (bytes read + written): mean of 10 after 3 warm-ups."""
    gpu = device.type == "cuda"
    n, dtype, nbytes = (8192, torch.bfloat16, 2 ** 31) if gpu else (1024, torch.float32, 2 ** 26)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    mm_ms = statistics.mean(timings(lambda: a @ b, device, 10, warmup=3))
    a = b = None  # frees them (the lambda is done)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = statistics.mean(timings(lambda: dst.copy_(src), device, 10, warmup=3))
    src = dst = None
    tflops, gbs = 2 * n ** 3 / mm_ms / 1e9, 2 * nbytes / copy_ms / 1e6
    mm, copy = f"{str(dtype)[6:]} matmul {n}^3", f"{'d2d ' * gpu}copy {nbytes / 2 ** 30:g} GiB"
    say(f"KEY ceiling: {mm} {num(tflops)} TFLOP/s; {copy} {num(gbs)} GB/s")
    return SimpleNamespace(tflops=tflops, gbs=gbs, rows=[
        dict(backend="ceiling", kernel=mm, calls=10, total_ms=mm_ms, model_flops=2 * n ** 3,
             tflops=tflops, pct_matmul_ceiling=100.0),
        dict(backend="ceiling", kernel=copy, calls=10, total_ms=copy_ms, model_bytes=2 * nbytes,
             gbs=gbs, pct_copy_ceiling=100.0)])


def make_step(args, backend, C, device):
    """The step: NormFace (cosine_softmax's defaults, mean reduction), forward and backward."""
    from normface_kernels import functional
    f = torch.randn(args.B, args.D, device=device, dtype=args.dtype, requires_grad=True)
    w = torch.randn(C, args.D, device=device, dtype=args.dtype, requires_grad=True)
    y = torch.randint(0, C, (args.B,), device=device)

    def step():
        f.grad = w.grad = None
        functional.cosine_softmax(f, w, y, backend=backend).backward()
    return step, f, w


def bare_gemms(f, w):
    """f W^T, G W, G^T f: the three products of the step (its floor), same shapes and dtype."""
    f, w = f.detach(), w.detach()
    g = torch.randn(f.shape[0], w.shape[0], device=f.device, dtype=f.dtype)
    return lambda: (f @ w.t(), g @ w, g.t() @ f)


def print_table(rows, what):
    say(f"   {what:<34} {'calls':>5} {'ms':>9} {'share':>6} {'TFLOP/s':>7} {'%mm':>5} "
        f"{'GB/s':>6} {'%copy':>5}  limiter")
    for r in rows[:TOP]:
        say(f"   {r['kernel'][:34]:<34} {r['calls']:>5} {r['total_ms']:>9.3f} "
            f"{pct(r['share']):>6} {num(r['tflops']):>7} "
            f"{num(r['pct_matmul_ceiling']):>5} {num(r['gbs']):>6} "
            f"{num(r['pct_copy_ceiling']):>5}  {r['limiter']}")
    if rows[TOP:]:
        say(f"   ({len(rows) - TOP} more: {100 * sum(r['share'] or 0 for r in rows[TOP:]):.1f}%)")


def profile_backend(args, backend, device, ceiling):
    """Warm-up, one profiled step, the step's and the bare GEMMs' median times; the report."""
    step, f, w = make_step(args, backend, args.C, device)
    step()  # warm-up: Triton compiles, cuBLAS picks its kernels
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step()
        sync(device)
    events = list(prof.events())
    step_ms = statistics.median(timings(step, device, args.reps, warmup=0))
    gemm_ms = statistics.median(timings(bare_gemms(f, w), device, args.reps))
    items = profile_items(events, device.type == "cuda")
    return report(args, backend, device, ceiling, events, items, step_ms, gemm_ms)


def report(args, backend, device, ceiling, events, items, step_ms, gemm_ms):
    """Prints a backend's table, step line and KEY lines; returns its profile.csv rows."""
    p = problem(args.B, args.C, args.D, args.dtype, device, backend == "triton" and triton_splits(
        args.B, args.C, args.D, args.dtype, device) or None)
    rows = kernel_rows(backend, items, p, events, ceiling)

    what = "kernels" if device.type == "cuda" else "ops (self CPU time)"
    say(f"\n== {backend}: cosine_softmax fwd+bwd, {str(args.dtype)[6:]} B={args.B} D={args.D} "
        f"C={args.C}: step {step_ms:.3f} ms (median of {args.reps}); {what} of the profiled "
        f"step: {sum(r['total_ms'] for r in rows):.3f} ms")
    print_table(rows, what)
    if not rows:
        say(f"   no {what} recorded (on a GPU: is CUPTI there?)")
    one_eq = 2 * args.B * args.C * args.D
    for r in rows:
        if r["kernel"] == GEMM_GROUP and r["model_flops"]:
            say(f"   {GEMM_GROUP} flops (recorded shapes): {r['model_flops'] / one_eq:.2f} GEMM-eq")
    if backend == "cuda" and device.type == "cuda":
        say("   GB/s of modelled bytes: the chunk buffers (S, P) are sized to the L2 cache, so "
            "the epilogues' traffic may be L2, not HBM")
    if backend == "triton" and p.splits is None:
        say("   (_softmax_fwd_kernel's bytes leave out its U partials: splits unknown)")
    gemm_eq, step_bytes = STEP_MODELS.get(backend, (None, None))
    flops, nbytes = gemm_eq and gemm_eq * one_eq, step_bytes and step_bytes(p)
    tflops, gbs, pm, pc = rates(flops, nbytes, step_ms * 1e3, ceiling)
    floor = 3 * one_eq / gemm_ms / 1e9
    line = (f"step {step_ms:.3f} ms = {step_ms / gemm_ms:.2f}x the 3 bare GEMMs ({gemm_ms:.3f} ms"
            f", {num(floor)} TFLOP/s)")
    if tflops is not None:
        line += f"; {gemm_eq} GEMM-eq at {num(tflops)} TFLOP/s ({num(pm, '%')} of matmul)"
    if gbs is not None:
        say(f"   model {nbytes / 1e9:.3g} GB per step: {num(gbs)} GB/s ({num(pc, '%')} of copy)")
    say(f"KEY {backend}: {line}")
    say(f"KEY {backend} top: " + "; ".join(
        f"{r['kernel']} {pct(r['share'])} {rate_text(r)} "
        f"{r['limiter']}".strip() for r in rows[:3]))
    return rows + [
        dict(backend=backend, kernel="(step)", calls=args.reps, total_ms=step_ms,
             model_flops=flops, model_bytes=nbytes, tflops=tflops, gbs=gbs,
             pct_matmul_ceiling=pm, pct_copy_ceiling=pc),
        dict(backend=backend, kernel="(3 bare GEMMs)", calls=args.reps, total_ms=gemm_ms,
             model_flops=3 * one_eq, tflops=floor,
             pct_matmul_ceiling=ceiling and 100 * floor / ceiling.tflops)]


def chunk_width(B, D, dtype):
    """Classes per chunk of the chunked path on this GPU (csrc/chunked/plan.cpp chunk_size)."""
    e = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20)
    chunk = min(256 * 2 ** 20, l2) // (B * acc + D * acc + (B * e if e == 2 else 0))
    return max(1, chunk - chunk % 128 if chunk >= 256 else chunk)


def ncu_step(args, backend, device):
    """Warm-up, then one step inside cudaProfilerStart/Stop (what ncu --profile-from-start off
    profiles). Backend cuda at two chunks (--ncu-cuda-C): its per-chunk kernels as at C = 1M."""
    C, note = args.C, ""
    if backend == "triton":  # norms of f and W, target cos, forward, merge, grad f, grad W
        note = f", about {7 + ATEN_LAUNCHES['triton']} launches, 6 matching the filter"
    if backend == "cuda" and device.type == "cuda":
        width = chunk_width(args.B, args.D, args.dtype)
        C = args.ncu_cuda_C or min(args.C, 2 * width)
        k = -(-C // width)  # per chunk: 4 GEMMs, 3 epilogues, U's add_; once: 4 row_norms,
        # 2 pair_cosines, 2 softmax_rows, finish_rows of grad f
        note = (f" ({k} chunks), about {8 * k + 9 + ATEN_LAUNCHES['cuda']} launches, "
                f"{7 * k + 5} matching the filter")
    say(f"{backend}: C={C}{note}")
    step, _, _ = make_step(args, backend, C, device)
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStart()
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStop()
    return []


def write_csv(path, rows):
    def cell(v):
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=COLUMNS)
        out.writeheader()
        out.writerows({k: cell(row.get(k)) for k in COLUMNS} for row in rows)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python3 scripts/gpu_profile.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    ap.add_argument("--backends", help="default triton,cuda (--device cpu: cpu,reference)")
    ap.add_argument("--B", type=int, help="default 1024 (--device cpu: 64)")
    ap.add_argument("--D", type=int, help="default 512 (--device cpu: 64)")
    ap.add_argument("--C", type=int, help="default 1048576 (--device cpu: 4096)")
    ap.add_argument("--dtype", help="default bfloat16 (--device cpu: float32)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps and bare-GEMM runs")
    ap.add_argument("--out", help="DIR for profile.csv")
    ap.add_argument("--ncu", action="store_true", help="only a warm-up and one step per backend "
                    "inside cudaProfilerStart/Stop: no ceilings, no torch.profiler")
    ap.add_argument("--ncu-cuda-C", type=int, default=0, help="C of backend cuda with --ncu "
                    "(default 0: two chunks of the chunked path on this GPU)")
    args = ap.parse_args(argv)
    for name, gpu, cpu in (("backends", "triton,cuda", "cpu,reference"), ("B", 1024, 64),
                           ("D", 512, 64), ("C", 1 << 20, 4096), ("dtype", "bfloat16", "float32")):
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.device == "cpu" else gpu)
    args.backends = [b for b in args.backends.split(",") if b]
    args.dtype = getattr(torch, args.dtype)
    return args


def header(args, device):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        name = f"{p.name}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size / 2 ** 20:g} MiB"
    return (f"gpu_profile: {name}; torch {torch.__version__}, triton {triton_version}; "
            f"{str(args.dtype)[6:]} B={args.B} D={args.D} C={args.C}, {','.join(args.backends)}")


def guarded(what, fn, *args):
    """fn(*args), or None after printing the error and a KEY line saying it failed."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - report it, go on with the next measurement
        traceback.print_exc()
        say(f"KEY {what}: FAILED ({type(error).__name__}: {str(error)[:150]})")
        return None


def main(argv=None):
    args = parse(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.device != "cpu" and not torch.cuda.is_available():
        say("gpu_profile: no CUDA GPU here; run it on the GPU machine, or with --device cpu as "
            "a smoke test")
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    say(header(args, device))
    if args.ncu:
        say(f"ncu filter for the modelled kernels: --kernel-name regex:'{NCU_REGEX}'")
    ceiling = None if args.ncu else guarded("ceiling", measure_ceilings, device)
    results = [] if args.ncu or ceiling is None else [ceiling.rows]
    failed = not args.ncu and ceiling is None
    stepped = 0
    for backend in args.backends:
        rows = guarded(backend, ncu_step if args.ncu else profile_backend, args, backend, device,
                       *([] if args.ncu else [ceiling]))
        failed = failed or rows is None
        stepped += rows is not None
        results.append(rows or [])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out and not args.ncu:
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "profile.csv"), [r for rows in results for r in rows])
        say(f"wrote {os.path.join(args.out, 'profile.csv')}")
    if args.ncu:   # under ncu: exit 0 if any backend stepped, so its report is still read
        return 0 if stepped else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
