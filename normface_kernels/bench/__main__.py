"""Command line: python -m normface_kernels.bench [--quick | --smoke | --targets-only] [...]"""

import argparse
import sys

from . import grid, runners
from .suite import Config, run

# Runs land where git ignores them; committing one (bench/results/) is a deliberate --out.
DEFAULT_OUT = "bench/runs"


def _csv(kind):
    def parse(text):
        return tuple(kind(item.replace("_", "")) if kind is int else kind(item)
                     for item in text.split(",") if item)
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m normface_kernels.bench",
        description="Benchmark this package's backends side by side with the peers "
                    "(forward, backward, full pass; time and extra peak memory).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="a small grid (about a minute on a 2-core CPU), with the CPU targets")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (for tests)")
    mode.add_argument("--targets-only", action="store_true",
                      help="only the foundation issue's two CPU measurements, with PASS/FAIL")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for the CSV, markdown and PNG (default {DEFAULT_OUT}, which "
                        f"git ignores; --out bench/results to commit a run)")
    p.add_argument("--name", default=None,
                   help="file stem (default DEVICE-MODE-DATE, e.g. cpu-quick-2026-11-25)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--backends", type=_csv(str), default=(),
                   help=f"only these, comma-separated, from {','.join(runners.ALL_BACKENDS)}")
    p.add_argument("--ops", type=_csv(str), default=(), help=f"from {','.join(grid.OPS)}")
    p.add_argument("--passes", type=_csv(str), default=(), help="from fwd,bwd,fwd_bwd")
    p.add_argument("--B", type=_csv(int), default=(), help="custom grid, e.g. --B 256,1024")
    p.add_argument("--D", type=_csv(int), default=(), help="custom grid")
    p.add_argument("--C", type=_csv(int), default=(), help="custom grid, e.g. --C 10_000,100_000")
    p.add_argument("--dtypes", type=_csv(str), default=(), help=f"from {','.join(grid.DTYPES)}")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--targets", dest="targets", action="store_true", default=None,
                         help="add the CPU targets to any grid")
    targets.add_argument("--no-targets", dest="targets", action="store_false")
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check of every timed backend against the reference")
    compile_ = p.add_mutually_exclusive_group()
    compile_.add_argument("--compile", dest="compile", action="store_const", const="on",
                          default="auto", help="torch.compile of the reference at every size")
    compile_.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    p.add_argument("--compile-max-c", type=int, default=8192,
                   help="CPU full grid: torch.compile only up to this C (default 8192)")
    p.add_argument("--cpu-budget", type=float, default=None,
                   help="CPU: seconds of repetitions per case and pass (default 1.5, quick 1.0)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads for the run (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name, allowed in (("backends", runners.ALL_BACKENDS), ("ops", grid.OPS),
                          ("passes", grid.PASSES), ("dtypes", grid.DTYPES)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def config_from_args(args):
    mode = ("quick" if args.quick else "smoke" if args.smoke else
            "targets" if args.targets_only else "full")
    budget = args.cpu_budget if args.cpu_budget is not None else (
        0.3 if mode == "smoke" else 1.0 if mode in ("quick", "targets") else 1.5)
    return Config(mode=mode, device=args.device, backends=args.backends, ops=args.ops,
                  passes=args.passes, Bs=args.B, Ds=args.D, Cs=args.C, dtypes=args.dtypes,
                  targets=args.targets, memory=not args.no_memory, check=not args.no_check,
                  compile=args.compile,
                  compile_max_c=args.compile_max_c, cpu_budget_s=budget,
                  min_reps=1 if mode == "smoke" else args.min_reps,
                  progress=not args.no_progress)


def _done_line(row):
    time_ms = f"{row.median_ms:.3f} ms" if row.median_ms else row.status
    return (f"done {row.op} B={row.B} D={row.D} C={row.C} {row.dtype} {row.pass_name} "
            f"{row.backend}: {time_ms}" + (f"; check {row.check}" if row.check else ""))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)   # the memory worker inherits it
    shown = set()

    def partial(report):
        # After each case: the CSV and markdown of what is measured so far, so that a run
        # stopped early (a time limit, Ctrl-C) keeps it. The plots come at the end.
        report.write(args.out, args.name, plots=False)
        if args.no_progress:   # no progress bar: a line per finished row, for logs
            for row in report.rows:
                key = row.case_key + (row.backend,)
                if key not in shown:
                    shown.add(key)
                    print(_done_line(row), flush=True)

    report = run(config_from_args(args), on_case=None if args.no_write else partial)
    print(report.text())
    if not args.no_write:
        paths = report.write(args.out, args.name)
        print("\nwrote " + ", ".join(paths))
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
