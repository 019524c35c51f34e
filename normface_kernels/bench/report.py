"""Results: the rows, the ratios, the targets, and the writers (stdout table, CSV, markdown, PNG).

CSV columns (one row per device, op, backend, B, D, C, dtype, pass):
    date device device_name torch triton op backend kind B D C dtype pass
    median_ms p20_ms p80_ms reps peak_mem_mb time_vs_best time_vs_gemm_floor mem_vs_best best
    status tag note
peak_mem_mb is the *extra* peak memory of the pass (peak during it minus what was held before:
inputs, weights, the forward's saved tensors for the backward). time_vs_best and mem_vs_best
divide by the fastest of this package's kernels (cpu, triton, cuda; the reference when none ran)
for the same case and pass, named in `best`; time_vs_gemm_floor divides by the bare matmuls.
"""

import csv
import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import textwrap

import torch

from . import check, grid

OURS_FAST = ("cpu", "triton", "cuda")
# What the columns of the table mean: printed under it on stdout and in the markdown.
LEGEND = (
    ("median ms", "median time of the pass; p20-p80 ms: its 20th to 80th percentile"),
    ("x best", "median ms / that of the fastest of this package's kernels (cpu, triton, cuda; "
               "the reference when none ran) on the same case and pass, which the CSV names in "
               "`best`: 1.00x is the fastest, 2.00x twice as slow"),
    ("x gemm", "median ms / that of gemm_floor, the three bare matmuls of the same shapes"),
    ("extra MiB", "peak memory during the pass minus what was held before it"),
    ("mem x best", "extra MiB / that of the same `best` backend as for x best"),
    ("check", "one forward+backward before the timing against the eager reference on the same "
              "inputs, upcast to float32 (float64 stays float64): the loss's relative error and "
              "the largest normwise relative error of the gradients w.r.t. features and weight "
              "(grad W also over the classes that are no sample's label alone) "
              "(\"loss only\" for peers whose leaves are other tensors: pre-normalized copies, "
              "pml's own W; n/a for gemm_floor). MISMATCH names what exceeds the tolerance, "
              "loss / grad: " + "; ".join(
                  f"{str(dtype).replace('torch.', '')} {t.loss:g} / {t.grad:g}"
                  for dtype, t in check.TOLERANCES.items())
              + f"; float32 with TF32 on CUDA {check.TF32.loss:g} / {check.TF32.grad:g}"),
)
CSV_COLUMNS = ("date", "device", "device_name", "torch", "triton", "op", "backend", "kind", "B",
               "D", "C", "dtype", "pass", "median_ms", "p20_ms", "p80_ms", "reps", "peak_mem_mb",
               "time_vs_best", "time_vs_gemm_floor", "mem_vs_best", "best", "check", "status",
               "tag", "note")


@dataclasses.dataclass
class Row:
    date: str
    device: str
    device_name: str
    torch: str
    triton: str
    op: str
    backend: str
    kind: str
    B: int
    D: int
    C: int
    dtype: str
    pass_name: str
    median_ms: float = None
    p20_ms: float = None
    p80_ms: float = None
    reps: int = None
    peak_mem_mb: float = None
    time_vs_best: float = None
    time_vs_gemm_floor: float = None
    mem_vs_best: float = None
    best: str = ""
    check: str = ""
    status: str = ""
    tag: str = ""
    note: str = ""

    @property
    def disagrees(self):
        """Whether the check found this row's result off the reference's."""
        return self.check.startswith(check.MISMATCH)

    @property
    def case_key(self):
        return (self.op, self.B, self.D, self.C, self.dtype, self.pass_name)

    def as_csv(self):
        values = dataclasses.asdict(self)
        values["pass"] = values.pop("pass_name")
        return {k: _csv_value(values[k]) for k in CSV_COLUMNS}


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclasses.dataclass
class Environment:
    date: str
    device: str
    device_name: str
    torch: str
    triton: str
    python: str
    threads: int
    package: str
    cpp: str
    peers: dict
    cpu_memory_method: str = ""
    seconds: float = 0.0
    phases: dict = dataclasses.field(default_factory=dict)
    load_start: str = dataclasses.field(default_factory=lambda: _loadavg())

    def row_fields(self):
        return dict(date=self.date, device=self.device, device_name=self.device_name,
                    torch=self.torch, triton=self.triton)

    def lines(self):
        peers = ", ".join(f"{k} {v}" for k, v in self.peers.items() if v) or "none"
        out = [f"date: {self.date}",
               f"device: {self.device} ({self.device_name}; torch threads {self.threads})",
               f"torch {self.torch}, triton {self.triton or 'not installed'}, "
               f"python {self.python}",
               f"normface_kernels {self.package}; C++ ops: {self.cpp}",
               f"peers installed: {peers}"]
        if self.device == "cpu":
            out.append("CPU extra peak memory: "
                       f"{self.cpu_memory_method or 'not measured'}, in a separate process")
        else:
            out.append("GPU extra peak memory: torch.cuda.max_memory_allocated over the pass "
                       "minus memory_allocated before it")
        if self.seconds:
            phases = ", ".join(f"{k} {v:.0f} s" for k, v in self.phases.items())
            out.append(f"run time: {self.seconds:.0f} s" + (f" ({phases})" if phases else ""))
            out.append(f"load average: {self.load_start} at the start, {_loadavg()} at the end")
            if self.device == "cpu" and _busy():
                out.append(f"WARNING: the load average exceeds the {os.cpu_count()} cores: other "
                           "processes were running, CPU times are noisy (compare ratios measured "
                           "side by side, not absolute times)")
        return out


def environment(device):
    from .. import __version__, _cpp_error
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} cores"
    commit = _git_commit()
    return Environment(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=device, device_name=name, torch=torch.__version__, triton=_version("triton"),
        python=platform.python_version(), threads=torch.get_num_threads(),
        package=__version__ + (f" (git {commit})" if commit else ""),
        cpp="loaded" if _cpp_error is None else f"not loaded ({_cpp_error})",
        peers={"liger-kernel": _version("liger-kernel"),
               "cut-cross-entropy": _version("cut-cross-entropy"),
               "pytorch-metric-learning": _version("pytorch-metric-learning")})


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _rows(n, one="", many=""):
    """'1 row disagrees', '3 rows disagree'."""
    return f"{n} row {one}".strip() if n == 1 else f"{n} rows {many}".strip()


class Report:
    def __init__(self, env, rows, skipped, notes, mode):
        self.env, self.rows, self.skipped, self.notes, self.mode = env, rows, skipped, notes, mode
        self._ratios()

    def _ratios(self):
        cases = {}
        for row in self.rows:
            cases.setdefault(row.case_key, []).append(row)
        for rows in cases.values():
            by_name = {r.backend: r for r in rows}
            # A row that disagrees with the reference is no one's baseline.
            timed = [r for r in rows if r.median_ms and r.backend in OURS_FAST
                     and not r.disagrees]
            if not timed and by_name.get("reference") and by_name["reference"].median_ms:
                timed = [by_name["reference"]]
            best = min(timed, key=lambda r: r.median_ms) if timed else None
            if best is None:   # memory-only cases: the smallest of ours
                held = [r for r in rows if r.peak_mem_mb is not None and r.backend in OURS_FAST
                        and not r.disagrees]
                best = min(held, key=lambda r: r.peak_mem_mb) if held else None
            floor = by_name.get("gemm_floor")
            for row in rows:
                if best is not None:
                    row.best = best.backend
                    row.time_vs_best = _ratio(row.median_ms, best.median_ms)
                    row.mem_vs_best = _ratio(row.peak_mem_mb, best.peak_mem_mb)
                if floor is not None:
                    row.time_vs_gemm_floor = _ratio(row.median_ms, floor.median_ms)

    def find(self, case, backend, pass_name="fwd_bwd"):
        for row in self.rows:
            if (row.case_key == case.key + (pass_name,) and row.backend == backend):
                return row
        return None

    # -- the foundation issue's two CPU targets --------------------------------------------

    def targets(self):
        """[(label, measured ratio or None, limit, verdict, detail)] when the targets ran."""
        out = []
        specs = [
            (grid.TARGET_TIME, "time", "median_ms", "ms", grid.TARGET_TIME_MAX_RATIO, "<="),
            (grid.TARGET_MEMORY, "extra peak memory", "peak_mem_mb", "MiB",
             grid.TARGET_MEMORY_MAX_RATIO, "<"),
        ]
        for case, what, field, unit, limit, op in specs:
            cpu, ref = self.find(case, "cpu"), self.find(case, "reference")
            if cpu is None and ref is None:
                continue
            label = (f"{what} cpu/reference, ArcFace m2=0.5 s=30 fp32 fwd+bwd, "
                     f"B={case.B} D={case.D} C={case.C:,}")
            a = getattr(cpu, field) if cpu is not None else None
            b = getattr(ref, field) if ref is not None else None
            ratio = _ratio(a, b)
            if ratio is None:
                why = ("cpu backend: " + (cpu.status if cpu is not None else
                                          self.skipped.get("cpu", "not run")))
                if b is None:
                    why = "reference: " + (ref.status if ref is not None else "not run")
                out.append((label, None, f"{op} {limit:g}", "N/A", why))
                continue
            ok = ratio <= limit if op == "<=" else ratio < limit
            detail = f"cpu {a:.4g} {unit} vs reference {b:.4g} {unit}"
            wrong = [r.backend for r in (cpu, ref) if r.disagrees]
            if wrong:  # a fast wrong answer passes nothing
                ok, detail = False, detail + f"; {', '.join(wrong)} disagrees with the reference"
            out.append((label, ratio, f"{op} {limit:g}", "PASS" if ok else "FAIL", detail))
        return out

    def targets_text(self):
        targets = self.targets()
        if not targets:
            return []
        lines = ["targets (measured side by side in this run):"]
        for label, ratio, limit, verdict, detail in targets:
            shown = "   n/a" if ratio is None else f"{ratio:6.3f}"
            lines.append(f"  [{verdict}] {label}: {shown} (target {limit}); {detail}")
        return lines

    # -- the correctness check -------------------------------------------------------------

    def check_lines(self):
        """The [CHECK] summary: the rows that disagree with the reference, or that all checked
        rows agree; then the rows whose check could not run. Empty when nothing was checked."""
        checked = [r for r in self.rows if r.check.startswith(("ok", check.MISMATCH))]
        bad = [r for r in checked if r.disagrees]
        failed = [r for r in self.rows if r.check.startswith(("error", "not checked"))]
        lines = []
        if bad:
            lines.append(f"[CHECK] {_rows(len(bad), 'disagrees', 'disagree')} with the reference: "
                         + _cases(bad, lambda r: r.check[len(check.MISMATCH):].strip()))
        elif checked:
            lines.append(f"[CHECK] all {len(checked)} checked rows agree with the reference")
        if failed:
            lines.append(f"[CHECK] {_rows(len(failed))} could not be checked: "
                         + _cases(failed, lambda r: r.check))
        return lines

    # -- writers ---------------------------------------------------------------------------

    def _sorted(self):
        order = {name: i for i, name in enumerate(grid.OPS)}
        passes = {p: i for i, p in enumerate(grid.PASSES)}
        from .runners import ALL_BACKENDS
        backends = {b: i for i, b in enumerate(ALL_BACKENDS)}
        return sorted(self.rows, key=lambda r: (r.tag != "", r.dtype, order.get(r.op, 99), r.B,
                                                r.D, r.C, passes[r.pass_name],
                                                backends.get(r.backend, 99)))

    def _constant_notes(self):
        """{backend: note} for backends whose note is the same on every row (said once)."""
        notes = {}
        for row in self.rows:
            notes.setdefault(row.backend, set()).add(row.note)
        return {b: n.pop() for b, n in notes.items() if len(n) == 1 and next(iter(n))}

    def table(self, markdown=False):
        head = ["op", "B", "D", "C", "dtype", "pass", "backend", "median ms", "p20-p80 ms",
                "x best", "x gemm", "extra MiB", "mem x best", "check", "status"]
        body, previous = [], None
        constant = self._constant_notes()
        for row in self._sorted():
            case = row.case_key
            same = case == previous and not markdown
            previous = case
            spread = ("" if row.p20_ms is None else f"{_fmt(row.p20_ms)}-{_fmt(row.p80_ms)}")
            status = row.status if row.status not in ("ok",) else ""
            if row.note and markdown and row.backend not in constant:
                status = _join(status, row.note)
            body.append(["" if same else v for v in (row.op, str(row.B), str(row.D),
                                                     f"{row.C:,}", row.dtype, row.pass_name)]
                        + [row.backend, _fmt(row.median_ms), spread,
                           _fmt(row.time_vs_best, 2, "x"), _fmt(row.time_vs_gemm_floor, 2, "x"),
                           _fmt(row.peak_mem_mb, 1), _fmt(row.mem_vs_best, 2, "x"), row.check,
                           status])
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |"
                      for r in body]
            return "\n".join(lines)
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
                  for i, h in enumerate(head[:-1])]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  status"]
        for r in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(lines)

    def skipped_lines(self):
        return [f"{name}: {why if why.startswith('skipped') else 'skipped: ' + why}"
                for name, why in self.skipped.items()]

    def text(self):
        out = ["normface_kernels benchmark" + (f" ({self.mode})" if self.mode else "")]
        out += ["  " + line for line in self.env.lines()]
        out += ["", self.table(), ""]
        out += [textwrap.fill(f"{name}: {meaning}", 100, initial_indent="  ",
                              subsequent_indent="      ") for name, meaning in LEGEND] + [""]
        if self.skipped:
            out += ["not run:"] + ["  " + line for line in self.skipped_lines()] + [""]
        if self.notes:
            out += list(self.notes) + [""]
        out += self.targets_text()
        out += self.check_lines()
        return "\n".join(out)

    def write(self, out_dir, stem=None, plots=True):
        """Write STEM.csv, STEM.md and STEM.png (when matplotlib is there and `plots`); returns
        the paths."""
        os.makedirs(out_dir, exist_ok=True)
        stem = stem or f"{self.env.device}-{self.mode or 'custom'}-{self.env.date[:10]}"
        paths = [os.path.join(out_dir, stem + ".csv")]
        with open(paths[0], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in self._sorted():
                writer.writerow(row.as_csv())
        from . import plot
        pngs = plot.write_plots(self, out_dir, stem) if plots else []
        md = os.path.join(out_dir, stem + ".md")
        with open(md, "w") as handle:
            handle.write(self.markdown([os.path.basename(p) for p in pngs]))
        return paths + [md] + pngs

    def markdown(self, pngs=()):
        out = [f"# normface_kernels benchmark: {self.env.device}, {self.mode or 'custom'} grid", ""]
        out += [f"- {line}" for line in self.env.lines()]
        out += ["", "Ops: " + "; ".join(f"`{s.name}` = {s.describe}" for s in grid.OPS.values()),
                "", "Times: GPU triton.testing.do_bench; CPU repetitions interleaved across "
                "backends. The linear-cross-entropy peers (torch_lce, liger_flce, cce) get "
                "pre-normalized inputs with the scale folded in: NormFace with the same GEMMs, "
                "no margin; they appear on the normface rows only.", ""]
        out += [f"- *{name}*: {meaning}" for name, meaning in LEGEND] + [""]
        constant = self._constant_notes()
        if constant:
            out += ["Backends: " + "; ".join(f"`{b}`: {n}" for b, n in constant.items()), ""]
        targets = self.targets_text()
        if targets:
            out += ["## Targets", "", "```"] + targets + ["```", ""]
        checks = self.check_lines()
        if checks:
            out += ["## Check", "", "```"] + checks + ["```", ""]
        if self.skipped:
            out += ["## Not run", ""] + [f"- {line}" for line in self.skipped_lines()] + [""]
        if self.notes:
            out += [f"- {n}" for n in self.notes] + [""]
        for png in pngs:
            out += [f"![{png}]({png})", ""]
        out += ["## Results", "", self.table(markdown=True), ""]
        return "\n".join(out)


def _loadavg():
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _busy():
    try:
        return max(os.getloadavg()[:2]) > (os.cpu_count() or 1) + 0.5
    except OSError:
        return False


def _cases(rows, detail):
    """"backend@op B= D= C= dtype (detail)" for each distinct (backend, case) of `rows`, in
    order: a case's passes share one check."""
    seen = {}
    for r in rows:
        seen.setdefault(f"{r.backend}@{r.op} B={r.B} D={r.D} C={r.C} {r.dtype}", detail(r))
    return "; ".join(f"{label} ({what})" for label, what in seen.items())


def _ratio(a, b):
    if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def _fmt(value, digits=3, suffix=""):
    if value is None:
        return ""
    if digits == 3:
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return f"{value:.{digits}f}{suffix}"


def _join(a, b):
    return b if not a else (a if not b else f"{a}; {b}")
