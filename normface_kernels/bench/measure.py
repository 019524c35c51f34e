"""Timing and peak-memory measurement.

Time. GPU: triton.testing.do_bench (median, 20th and 80th percentiles, L2 flushed between
repetitions) for the forward and the full pass; the backward alone needs a fresh forward before
each repetition, so it is timed with CUDA events around the backward only. CPU: wall clock over
repetitions, *interleaved* across the backends of one case (A B C A B C ...), so that load from
other processes on a shared machine hits every backend alike; median and 20th/80th percentiles.

Extra peak memory = the peak during the pass minus the memory held just before it (inputs,
weights, and for the backward the forward's saved tensors). GPU: torch.cuda's allocator
statistics. CPU: torch keeps no allocator statistics there, so it is the process's resident set:
the kernel's peak-RSS mark is reset (`5` into /proc/self/clear_refs resets VmHWM to the current
RSS) just before the pass and VmHWM is read after it. For that to be honest, glibc is told to
serve every allocation above 64 KiB with its own mmap (freed memory goes back to the kernel and
RSS follows what is live) and this runs in a separate process (memworker.py), not the one that
did the timing.
"""

import ctypes
import gc
import re
import statistics
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------

def _quantile(sorted_values, q):
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms):
    """(median, p20, p80, n) of a list of milliseconds."""
    values = sorted(times_ms)
    return (statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8),
            len(values))


def cpu_time_interleaved(steps, budget_s=1.5, min_reps=3, max_reps=25, warm_s=None):
    """Time several backends' (setup, timed) steps in rounds, one repetition of each per round.

    steps: {name: (setup, timed)}. One untimed warm-up each, unless warm_s ({name: seconds})
    gives the time of one the caller just ran; then enough rounds to spend about `budget_s` (at
    least min_reps, at most max_reps). Returns {name: [ms, ...]} and, for those that raised,
    {name: exception}.
    """
    warm, errors = dict(warm_s or {}), {}
    for name, (setup, timed) in steps.items():
        if name in warm:
            continue
        try:
            state = setup()
            t0 = time.perf_counter()
            timed(state)
            warm[name] = time.perf_counter() - t0
            del state
        except Exception as error:  # noqa: BLE001 - reported in the results, not fatal
            errors[name] = error
    live = [name for name in steps if name not in errors]
    if not live:
        return {}, errors
    round_s = sum(warm[name] for name in live)
    reps = max(min_reps, min(max_reps, int(budget_s / max(round_s, 1e-6))))
    times = {name: [] for name in live}
    for r in range(reps):
        order = live[r % len(live):] + live[:r % len(live)]   # rotate who goes first
        for name in order:
            if name in errors:
                continue
            setup, timed = steps[name]
            try:
                state = setup()
                t0 = time.perf_counter()
                timed(state)
                times[name].append((time.perf_counter() - t0) * 1e3)
                del state
            except Exception as error:  # noqa: BLE001
                errors[name] = error
                del times[name]
    return times, errors


def gpu_time(setup, timed, fresh_setup, rep_ms=100, warmup_ms=25):
    """GPU milliseconds (median, p20, p80, n) of `timed`.

    fresh_setup False: do_bench of setup+timed (setup only zeroes gradients: free).
    fresh_setup True (the backward): `setup` runs a forward before each repetition, so CUDA
    events bracket `timed` alone, with the L2 cache flushed first as do_bench does.
    """
    if not fresh_setup:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(lambda: timed(setup()), warmup=warmup_ms, rep=rep_ms,
                                        quantiles=list(QUANTILES))
            return median, p20, p80, None
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    state = setup()
    timed(state)
    del state
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    state = setup()
    timed(state)
    del state
    torch.cuda.synchronize()
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = max(5, min(1000, int(rep_ms / one_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        state = setup()
        flush.zero_()
        starts[i].record()
        timed(state)
        ends[i].record()
        del state
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def gpu_extra_peak_mb(setup, timed):
    """Peak allocated during one `timed(setup())` minus what was allocated when it began."""
    state = setup()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    timed(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del state
    return (peak - before) / 2**20


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc_for_rss(threshold=64 * 1024):
    """Make glibc mmap every allocation above `threshold` (and trim eagerly), so that freed
    tensors leave the resident set at once. Returns False where this is not glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    return bool(ok)


def release_free_memory():
    # Collect, then freeze what survived: torch's many long-lived objects would otherwise make
    # every later collection slow (each one now scans only what was created since).
    gc.collect()
    gc.freeze()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_kb(field):
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else None


def reset_peak_rss():
    """Reset VmHWM to the current RSS; the RSS in MiB after the reset, or None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    hwm = _status_kb("VmHWM")
    return None if hwm is None else hwm / 1024


def peak_rss_mb():
    hwm = _status_kb("VmHWM")
    return None if hwm is None else hwm / 1024


def hwm_reset_works():
    """Check on this kernel that a reset really brings VmHWM down to the current RSS after an
    earlier, higher peak (64 MiB touched and freed)."""
    release_free_memory()
    block = torch.ones(64 * 2**20 // 4)
    del block
    release_free_memory()
    hwm = reset_peak_rss()
    rss = _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm - rss / 1024 < 16


def cpu_extra_peak_mb(setup, timed):
    """Extra peak RSS (MiB) of one `timed(setup())`, with the VmHWM reset (see module doc)."""
    state = setup()
    release_free_memory()
    before = reset_peak_rss()
    timed(state)
    peak = peak_rss_mb()
    del state
    return max(peak - before, 0.0)


def maxrss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_extra_peak_mb_maxrss(setup, timed):
    """Fallback without a VmHWM reset: ru_maxrss after the pass minus the RSS before it. Only
    meaningful when the pass sets a new process-wide peak (a fresh process that allocated its
    inputs, nothing bigger); None when it did not, since the pass's own peak is then unknown."""
    state = setup()
    release_free_memory()
    rss_before = _status_kb("VmRSS") / 1024
    maxrss_before = maxrss_mb()
    timed(state)
    after = maxrss_mb()
    del state
    return after - rss_before if after > maxrss_before else None
