"""The benchmark run: every case of the grid, every available backend and peer on the same
inputs, time then memory, and the ratios. `run(Config(...))` returns a Report (report.py writes
it out); `python -m normface_kernels.bench` is the command-line front of this.
"""

import dataclasses
import gc
import sys
import time

import torch

from . import check, grid, measure, runners
from .report import Report, Row, environment

SKIP_COMPILE_CPU = ("skipped in --targets-only / --smoke on CPU: inductor compiles C++ for every "
                    "op and shape (10-30 s each on a 2-core machine); --compile forces it")
SKIP_COMPILE_QUICK = ("skipped in --quick on CPU except for " + ", ".join(
    f"{op} C={c:,}" for op, c in grid.QUICK_CPU_COMPILE) + " (inductor compile time: 10-30 s per "
    "op and shape on 2 cores); the full grid runs it up to --compile-max-c")


@dataclasses.dataclass
class Config:
    mode: str = "quick"               # smoke | quick | full | targets
    device: str = "auto"              # auto | cpu | cuda
    backends: tuple = ()              # only these (empty: all)
    ops: tuple = ()                   # only these ops (empty: all)
    passes: tuple = ()                # only these passes (empty: all)
    Bs: tuple = ()                    # a custom grid (with Ds, Cs, dtypes) instead of the mode's
    Ds: tuple = ()
    Cs: tuple = ()
    dtypes: tuple = ()
    targets: bool = None              # None: with --quick / full on CPU
    memory: bool = True
    check: bool = True                # compare every timed backend with the reference first
    compile: str = "auto"             # auto | on | off (torch.compile of the reference)
    compile_max_c: int = 8192         # CPU, full grid: torch.compile only up to this C
    cpu_budget_s: float = 1.5         # CPU: seconds of repetitions per (case, pass), all backends
    min_reps: int = 3
    max_reps: int = 25
    gpu_rep_ms: int = 100
    memory_headroom: float = 0.6      # skip a backend whose estimate exceeds this share of free
    progress: bool = True


def _device(config):
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return config.device


def build_cases(config, device):
    if config.Bs or config.Ds or config.Cs or config.dtypes:
        cases = grid.custom_grid(config.ops or list(grid.OPS), config.Bs or [256],
                                 config.Ds or [128], config.Cs or [2048, 8192],
                                 config.dtypes or ["float32"], config.passes or grid.PASSES)
        with_targets = bool(config.targets)
    elif config.mode == "smoke":
        cases, with_targets = grid.smoke_grid(), bool(config.targets)
    elif config.mode == "targets":
        cases, with_targets = [], True
    elif config.mode == "quick":
        cases = [c for c in grid.quick_grid(device) if not c.tag]
        with_targets = device == "cpu" if config.targets is None else config.targets
    else:
        cases = [c for c in grid.full_grid(device) if not c.tag]
        with_targets = device == "cpu" if config.targets is None else config.targets
    if config.ops:
        cases = [c for c in cases if c.op in config.ops]
    if config.passes:
        cases = [dataclasses.replace(c, passes=tuple(p for p in c.passes if p in config.passes))
                 for c in cases]
        cases = [c for c in cases if c.passes]
    if with_targets:
        cases += grid.targets()
    return cases


def _free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float("inf")


class _Progress:
    def __init__(self, total, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True,
                                leave=True)
            except ImportError:
                pass
        self.total, self.count, self.enabled = total, 0, enabled

    def step(self, what, n=1):
        self.count += n
        if self.bar is not None:
            self.bar.set_description_str(what[:48])
            self.bar.update(n)
        elif self.enabled:
            print(f"[{self.count}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Suite:
    def __init__(self, config):
        self.config = config
        self.device = _device(config)
        self.env = environment(self.device)
        self.cases = build_cases(config, self.device)
        custom = config.Bs or config.Ds or config.Cs or config.dtypes
        self.label = "custom" if custom else config.mode
        self.rows = {}
        self.notes = []
        self.compile_skips = 0
        self.skipped = {}   # backend -> reason, for the whole run
        names = [b for b in runners.ALL_BACKENDS
                 if not config.backends or b in config.backends]
        for name in names:
            why = runners.unavailable_reason(name, self.device)
            if why is None and name == "torch_compile":
                why = self._compile_policy()
            if why is not None:
                self.skipped[name] = why
        self.backends = [b for b in names if b not in self.skipped]

    def _compile_policy(self):
        if self.config.compile == "off":
            return "skipped: --no-compile"
        if self.config.compile == "on" or self.device == "cuda":
            return None
        return SKIP_COMPILE_CPU if self.config.mode in ("smoke", "targets") else None

    # -- which backends a case gets, and why not the others --------------------------------

    def _plan(self, case):
        plan, skips = [], {}
        free = _free_bytes(self.device)
        for name in self.backends:
            if case.backends and name not in case.backends:
                continue
            if not runners.applies(name, case.op):
                continue
            if name == "torch_compile" and self.device == "cpu" and self.config.compile != "on":
                if self.label == "quick" and (case.op, case.C) not in grid.QUICK_CPU_COMPILE:
                    if not case.tag:
                        self.compile_skips += 1
                    continue
                if case.C > self.config.compile_max_c:
                    skips[name] = (f"skipped: C > {self.config.compile_max_c} on CPU "
                                   "(inductor compile time; --compile-max-c)")
                    continue
            need = runners.estimated_bytes(name, case)
            if need > self.config.memory_headroom * free:
                skips[name] = (f"skipped: needs ~{need / 2**30:.1f} GiB, "
                               f"{free / 2**30:.1f} GiB free")
                continue
            plan.append(name)
        return plan, skips

    def _row(self, case, backend, pass_name, **fields):
        key = case.key + (pass_name, backend)
        row = self.rows.get(key)
        if row is None:
            row = Row(op=case.op, backend=backend, kind=runners.KIND[backend], B=case.B, D=case.D,
                      C=case.C, dtype=case.dtype, pass_name=pass_name, tag=case.tag,
                      **self.env.row_fields())
            self.rows[key] = row
        for name, value in fields.items():
            if name == "note" and row.note and value and value not in row.note:
                value = row.note + "; " + value
            setattr(row, name, value)
        return row

    # -- the run ---------------------------------------------------------------------------

    def _report(self):
        return Report(self.env, list(self.rows.values()), self.skipped, self.notes, self.label)

    def run(self, on_case=None):
        plans = [(case,) + self._plan(case) for case in self.cases]
        if self.compile_skips:
            self.notes.append(f"torch_compile: {SKIP_COMPILE_QUICK}")
        with_memory = self.config.memory
        units = sum(len(plan) * len(case.passes) * (case.time + (case.memory and with_memory))
                    for case, plan, _ in plans)
        progress = _Progress(units, self.config.progress)
        started = time.time()
        memory_jobs = []
        try:
            for case, plan, skips in plans:
                for name, why in skips.items():
                    for pass_name in case.passes:
                        self._row(case, name, pass_name, status=why)
                if case.time:
                    self._time_case(case, plan, progress)
                elif self.device == "cuda" and case.memory and self.config.memory:
                    self._gpu_memory_only(case, plan, progress)
                if self.device == "cpu" and case.memory and self.config.memory:
                    memory_jobs += [(case, name) for name in plan]
                if on_case is not None:
                    on_case(self._report())
            self.env.phases["time"] = time.time() - started
            if memory_jobs:
                t0 = time.time()
                self._cpu_memory(memory_jobs, progress)
                self.env.phases["memory (separate process)"] = time.time() - t0
        finally:
            progress.close()
        self.env.seconds = time.time() - started
        return self._report()

    def _runners(self, case, plan, checked=False):
        """The case's inputs and a Runner for each backend of `plan`, each run once before any
        timing (torch.compile compiles then; with `checked`, every run is compared with the
        reference, see check.py, and the verdict goes into the rows' `check`)."""
        inputs = runners.Inputs.make(case, self.device)
        want = self._expected(case, inputs) if checked else None
        made = {}
        for name in plan:
            try:
                runner = runners.make_runner(name, case.op, inputs)
                verdict = self._first_pass(runner, inputs, want)
            except Exception as error:  # noqa: BLE001 - a peer failing is a result, not a crash
                self._free()
                for pass_name in case.passes:
                    self._row(case, name, pass_name, status=_error(error))
                continue
            made[name] = runner
            for pass_name in case.passes:
                self._row(case, name, pass_name, check=verdict)
        del want        # the expected gradients: (C, D) floats, gigabytes on a GPU case
        self._free()
        return inputs, made

    def _expected(self, case, inputs):
        """check.expected for the case, within the memory the backends may use; the error's
        text instead when even that fails."""
        budget = self.config.memory_headroom * _free_bytes(self.device)
        try:
            return check.expected(case.op, inputs, budget)
        except Exception as error:  # noqa: BLE001 - the rows say it; the timing goes on
            self._free()
            return "not checked: reference " + _error(error)

    def _first_pass(self, runner, inputs, want):
        """One forward+backward of `runner` before its timing, compared with `want` when that is
        a check.Expected; returns the `check` text. An error there is the check's, but for
        torch.compile, whose first call is its compile: that error is raised (nothing to time)."""
        compiling = runner.name == "torch_compile"
        checked = isinstance(want, check.Expected)
        try:
            if checked:
                verdict = check.check_runner(runner, inputs, want)
            elif compiling:
                check.first_pass(runner)
                runner.zero_grad()
        except Exception as error:  # noqa: BLE001
            if compiling:
                raise
            self._free()
            return _error(error)
        if compiling:
            runner.setup_seconds = runner.first_pass_s
            runner.note = f"first call (compile) {runner.setup_seconds:.1f} s"
        if checked:
            return verdict
        if want is None:
            return ""
        return want if check.compares(runner, inputs) else check.NOT_APPLICABLE

    def _free(self):
        """Give the memory of what was just dropped back to the GPU. On CPU reference counting
        frees it at once, and a gc.collect would cost ~0.2 s (torch's many objects)."""
        if self.device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _time_case(self, case, plan, progress):
        inputs, made = self._runners(case, plan, checked=self.config.check)
        for pass_name in case.passes:
            steps = {name: runners.pass_steps(r, pass_name) for name, r in made.items()}
            label = f"{case.op} C={case.C} {pass_name}"
            if self.device == "cpu":
                times, errors = measure.cpu_time_interleaved(
                    steps, budget_s=self.config.cpu_budget_s * (2 if case.tag else 1),
                    min_reps=max(self.config.min_reps, 5 if case.tag else 0),
                    max_reps=self.config.max_reps, warm_s=_warmed(made, pass_name))
                for name, error in errors.items():
                    self._row(case, name, pass_name, status=_error(error), note=made[name].note)
                for name, values in times.items():
                    median, p20, p80, n = measure.summarize(values)
                    self._row(case, name, pass_name, median_ms=median, p20_ms=p20, p80_ms=p80,
                              reps=n, status="ok", note=made[name].note)
                progress.step(label, len(plan))
                continue
            for name, (setup, timed) in steps.items():
                runner = made[name]
                try:
                    median, p20, p80, n = measure.gpu_time(setup, timed, pass_name == "bwd",
                                                           rep_ms=self.config.gpu_rep_ms)
                    fields = dict(median_ms=median, p20_ms=p20, p80_ms=p80, reps=n, status="ok")
                    if case.memory and self.config.memory:
                        fields["peak_mem_mb"] = measure.gpu_extra_peak_mb(setup, timed)
                except Exception as error:  # noqa: BLE001
                    fields = dict(status=_error(error))
                    torch.cuda.empty_cache()
                self._row(case, name, pass_name, note=runner.note, **fields)
                runner.zero_grad()
                progress.step(f"{label} {name}", 1 + (case.memory and self.config.memory))
        del inputs, made
        gc.collect()

    def _gpu_memory_only(self, case, plan, progress):
        inputs, made = self._runners(case, plan)
        for pass_name in case.passes:
            for name, runner in made.items():
                setup, timed = runners.pass_steps(runner, pass_name)
                try:
                    mb = measure.gpu_extra_peak_mb(setup, timed)
                    self._row(case, name, pass_name, peak_mem_mb=mb, status="ok (memory only)",
                              note=runner.note)
                except Exception as error:  # noqa: BLE001
                    self._row(case, name, pass_name, status=_error(error))
                    torch.cuda.empty_cache()
                runner.zero_grad()
                progress.step(f"memory {case.op} C={case.C} {pass_name} {name}")
        del inputs, made
        gc.collect()

    def _cpu_memory(self, memory_jobs, progress):
        from . import memworker  # imported here: `python -m ...memworker` must load it fresh
        gc.collect()
        jobs = [dict(op=c.op, B=c.B, D=c.D, C=c.C, dtype=c.dtype, passes=list(c.passes),
                     backend=name) for c, name in memory_jobs]

        def on_result(index, pass_name, mb, error):
            case, name = memory_jobs[index]
            row = self._row(case, name, pass_name)
            if error is not None:
                row.status = _join(row.status, f"memory: {error}")
            elif mb is None:
                row.status = _join(row.status, "memory: no new peak (ru_maxrss fallback)")
            else:
                row.peak_mem_mb = mb
                if not case.time:
                    row.status = "ok (memory only)"
            progress.step(f"memory {case.op} C={case.C} {pass_name} {name}")

        def on_method(method):
            self.env.cpu_memory_method = method

        memworker.run_jobs(jobs, on_result, on_method)


def _warmed(made, pass_name):
    """{backend: seconds} of the first forward+backward each runner made (the check's): the
    warm-up of the full pass, which the CPU timing then need not repeat. Not torch.compile's,
    whose first call was its compile."""
    if pass_name != "fwd_bwd":
        return {}
    return {name: r.first_pass_s for name, r in made.items()
            if r.first_pass_s is not None and name != "torch_compile"}


def _error(error):
    text = str(error).strip().splitlines()
    return f"error: {type(error).__name__}: {text[0][:160] if text else ''}"


def _join(a, b):
    return b if not a else f"{a}; {b}"


def run(config=None, on_case=None, **overrides):
    """Run the benchmark; returns the Report (not yet written anywhere). on_case(report), if
    given, gets the report of the cases measured so far after each case (partial results)."""
    config = dataclasses.replace(config or Config(), **overrides)
    return Suite(config).run(on_case)
