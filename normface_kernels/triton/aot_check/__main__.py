"""The AOT check's command line and its table (see __init__.py)."""

import argparse
import os
import sys
import tempfile
import time

import torch

from . import __doc__ as DOC
from .compile import compile_all, unique_configs
from .record import DIMS, TARGETS, record


def _origin(scenarios):
    """'bf16,fp16 D=128,512' from the scenario tags that produced a configuration."""
    dtypes, dims, names = [], [], []
    for tag in scenarios:
        parts = tag.split()
        name, dtype, dim = parts[0], parts[1], parts[2]
        for lst, v in ((dtypes, dtype), (dims, dim[2:]), (names, name.split("/")[0])):
            if v not in lst:
                lst.append(v)
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
    return (",".join(short.get(d, d) for d in dtypes) + " D=" + ",".join(dims),
            ",".join(names))


def _failed(result):
    return bool(result.error or result.problems)


def report(rows, out=sys.stdout):
    """One line per configuration: resources, then what it is and where it came from."""
    header = (f"{'target':6} {'kernel':30} {'in':5} {'warps':>5} {'stg':>3} {'regs':>4} "
              f"{'spill st/ld':>11} {'smem KB':>7} {'sec':>5}  status  "
              "constexprs | pointer types | from")
    print(header, file=out)
    print("-" * len(header), file=out)
    for config, result in rows:
        where, ops = _origin(config.scenarios)
        detail = result.error or "; ".join(result.problems)
        print(f"{result.target:6} {config.kernel[:30]:30} {config.in_dtype:5} "
              f"{config.num_warps:>5} {config.num_stages:>3} {result.regs:>4} "
              f"{result.spill_stores:>5}/{result.spill_loads:<5} {result.shared / 1024:>7.1f} "
              f"{result.seconds:>5.1f}  {'FAIL' if _failed(result) else 'ok':6}  "
              f"{config.constexprs} | ptrs {config.pointers} | {where} [{ops}]"
              + (f"\n         -> {detail}" if detail else ""), file=out)


def report_kernels(rows, out=sys.stdout):
    """One line per (target, kernel, input dtype): the worst of its configurations."""
    groups = {}
    for config, result in rows:
        groups.setdefault((result.target, config.kernel, config.in_dtype), []).append(result)
    print(f"{'target':6} {'kernel':30} {'in':5} {'configs':>7} {'max regs':>8} "
          f"{'max smem KB':>11} {'spilling':>8} {'failed':>6}", file=out)
    for (target, kernel, dtype), results in groups.items():
        ok = [r for r in results if not r.error]
        print(f"{target:6} {kernel[:30]:30} {dtype:5} {len(results):>7} "
              f"{max((r.regs for r in ok), default=0):>8} "
              f"{max((r.shared for r in ok), default=0) / 1024:>11.1f} "
              f"{sum(1 for r in results if r.spill_stores or r.spill_loads):>8} "
              f"{sum(1 for r in results if _failed(r)):>6}", file=out)


def summarize(rows, seconds, failures):
    lines = []
    for target in sorted({r.target for _, r in rows}):
        mine = [(c, r) for c, r in rows if r.target == target]
        ok = [r for _, r in mine if not r.error]
        kernels = {c.kernel for c, _ in mine}
        spilled = [(c, r) for c, r in mine if r.spill_stores or r.spill_loads]
        failed = [(c, r) for c, r in mine if _failed(r)]
        lines.append(
            f"{target}: {len(kernels)} kernels, {len(mine)} configs, "
            f"max regs {max((r.regs for r in ok), default=0)}, "
            f"max shared {max((r.shared for r in ok), default=0) / 1024:.1f} KB, "
            f"{len(spilled)} with spills "
            f"({', '.join(sorted({c.kernel + '/' + c.in_dtype for c, _ in spilled})) or 'none'}),"
            f" {len(failed)} failed")
    lines.append(f"scenario failures: {len(failures)}; total {seconds:.0f} s")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m normface_kernels.triton.aot_check", description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="GPU target(s) to compile for (default: sm90)")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32",
                                                        "float64"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    parser.add_argument("--list", action="store_true", help="record and list, compile nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    start = time.perf_counter()
    targets = [TARGETS[name] for name in (args.target or ["sm90"])]
    dtypes = [getattr(torch, name) for name in args.dtypes]
    work, failures = [], []
    for target in targets:
        launches, failed = record(target, args.dims, dtypes)
        failures += failed
        configs = unique_configs(launches, target)
        if args.kernel:
            configs = [c for c in configs if args.kernel in c.kernel]
        work += [(config, target) for config in configs]
        print(f"{target.name}: {len(launches)} launches recorded -> {len(configs)} unique "
              f"configurations of {len({c.kernel for c in configs})} kernels "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    for tag, error in failures:
        print(f"FAIL scenario {tag}: {error}")
    if args.list:
        for config, _ in work:
            print(f"{config.kernel:30} {config.in_dtype:5} w{config.num_warps} "
                  f"s{config.num_stages} {config.constexprs}")
        return 1 if failures else 0
    # A fresh cache: every configuration is really compiled and its ptxas log read.
    with tempfile.TemporaryDirectory(prefix="normface-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        results = compile_all(work, args.jobs)
    rows = sorted(zip((c for c, _ in work), results),
                  key=lambda cr: (cr[1].target, cr[0].kernel, cr[0].in_dtype, cr[0].constexprs))
    report(rows)
    print()
    report_kernels(rows)
    print()
    for line in summarize(rows, time.perf_counter() - start, failures):
        print(line)
    bad = failures or any(_failed(r) for _, r in rows)
    print("AOT check FAILED" if bad else "AOT check passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
