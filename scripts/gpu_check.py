"""The whole GPU validation in one command, on a GPU machine (8 minutes on one H200 with 16
cores, the build included; the machine needs no package registry: python3 with torch, triton,
pytest, nvcc and compute-sanitizer, as on this project's H200):

    make gpu-check DIR=out                   # or: python3 scripts/gpu_check.py out
    python3 scripts/gpu_check.py out --dry-run   # every stage's commands, runs nothing
    python3 scripts/gpu_check.py out --only build,cuda-tests --budget 300

Through the device tool (`make gpu-wheels` here first, once: the benchmark's peers as wheels;
the command needs no `make` there):
    run(command='python3 scripts/gpu_check.py "$OUT"', carry=[".whl"], timeout_s=600)
and a rerun after fixes, without rebuilding when csrc/ did not change: unpack the first run's
results.tar.gz here (`make gpu-unpack FROM=<files_at>`, which fills .gpu-ext/), then
    run(command='python3 scripts/gpu_check.py "$OUT" --only ... --budget 150',
        carry=[".whl", ".gpu-ext"])

Two phases inside one budget (--budget, default BUDGET = 480 s). The checks phase runs three
lanes side by side (each lane's stages in order; correctness does not suffer from sharing the
GPU), then the measure phase runs its stages one at a time, alone on the machine, with
MEASURE_SECONDS kept for it. Every stage has its own time cap (and a least time it needs to be
started); a failing or timed-out stage does not stop the later ones.
  checks / cuda lane
    build          the extension against this machine's torch (MAX_JOBS=nproc, sm_90, ptxas -v);
                   skipped when .gpu-ext/ holds a build of the same csrc/ for the same torch
    cuda-resources registers / spills / stack of every CUDA kernel (scripts/cuda_resource_check)
    sync-graph     a training step under torch.cuda.set_sync_debug_mode("error") with the data
                   checks off, and its capture and replay in a CUDA graph (scripts/gpu_smoke_graph)
    nccl           a 1-rank NCCL ShardedNormFaceLoss step against NormFaceLoss (gpu_smoke_nccl)
    cuda-tests     python_tests/test_cuda_*.py, the shared scenarios' and the fuzz's cuda cases
  checks / triton lane (in a copy of the tree with a CPU-only build of the extension, so that
  it need not wait for the CUDA build: the Triton tests use no CUDA C++ kernel)
    triton-tests   python_tests/test_triton*.py and the shared scenarios' triton cases, compiled
  checks / sanitizer lane
    peers          installs the carried wheels (.whl/: Liger-Kernel, Cut Cross-Entropy)
    memcheck       compute-sanitizer memcheck on every public op (cuda and triton, gpu_smoke_ops)
    racecheck      compute-sanitizer racecheck on the same calls (cuda)
  measure (alone)
    bench-rows     cosine_softmax (normface) bf16 fwd+bwd, B=1024, D=512, C=1M/128k/16k: triton,
                   cuda, gemm_floor, eager, torch.compile, Liger-Kernel, Cut Cross-Entropy
    profile        ceilings (bf16 8192^3 matmul, d2d copy) and every kernel of a training step at
                   C=1M: time, TFLOP/s, GB/s (scripts/gpu_profile.py)
    ncu            Nsight Compute: speed of light, occupancy, launch statistics of each kernel

DIR receives at most 8 files, each at most 16 MiB, no sub-folders: summary.md (one page, written
last), gpu-check.log (every command, its time and exit status), build.log, cuda.log, triton.log,
sanitizer.log, bench.log, results.tar.gz (bench/: the benchmark's CSV/markdown/PNG, profile and
ncu tables; ext/: the built extension, for a rerun without the build).
Without a CUDA GPU it stops at once with a message (exit 2); exit 1 if any stage did not pass.
"""

import argparse
import collections
import csv
import glob
import hashlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE = 16 * 2 ** 20 - 2 ** 16  # the device tool brings back files up to 16 MiB
FILES = ("summary.md", "gpu-check.log", "build.log", "cuda.log", "triton.log", "sanitizer.log",
         "bench.log", "results.tar.gz")
# 480 s: with the machine's start (1-2 min) and its 30 s warm tail, a 15-minute device session
# keeps the 4 minutes a second start needs, for one rerun of what failed.
BUDGET = 480
RESERVE = 15           # seconds kept for the summary
MEASURE_SECONDS = 240  # kept for the measure phase: bench-rows and profile (ncu if time is left)
BENCH_CLASSES = (1_048_576, 131_072, 16_384)  # the targets' size first
WHEELS = os.path.join(ROOT, ".whl")           # carried wheels (make gpu-wheels)
CARRIED_EXT = os.path.join(ROOT, ".gpu-ext")  # a carried build (make gpu-unpack)
# Not copied into the Triton lane's tree: builds, environments, results, caches.
SNAPSHOT_IGNORE = {".git", "build", ".venv", ".venv-oldest", ".ci-oldest", ".whl", ".gpu-ext",
                   "gpu-check-out", "runs", "__pycache__", ".hypothesis", ".pytest_cache",
                   "cmake-build"}
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats")
NCU_METRICS = {"Duration": "duration", "Compute (SM) Throughput": "sm_pct",
               "Memory Throughput": "mem_pct", "DRAM Throughput": "dram_pct",
               "Achieved Occupancy": "occupancy_pct", "Registers Per Thread": "registers",
               "Grid Size": "grid", "Block Size": "block"}


@dataclass
class Stage:
    name: str
    cap: int                  # seconds
    commands: list            # [[arg, ...], ...] run one after the other
    log: str                  # file in DIR
    env: dict = field(default_factory=dict)
    what: str = ""
    lane: str = "cuda"        # checks phase: "cuda", "triton", "sanitizer"; or "measure"
    after: tuple = ()         # stages of other lanes that must have passed first
    requires: tuple = ()      # stages --only brings along (the build, the peers' install)
    min_seconds: int = 10     # not started with less time left
    cwd: str = ROOT
    skip_why: str = ""        # set: the stage is not run (e.g. nothing to install)
    carried: str = ""         # build: the carried extension used instead of building

    # filled in by run_stage
    status: str = "not run"
    seconds: float = 0.0
    key: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    waits_for: list = field(default_factory=list)   # the chosen stages of `after` (run_all)

    def __post_init__(self):
        self.requires = tuple(dict.fromkeys(self.requires + self.after))


@dataclass
class Work:
    """Scratch folders of a run (outside DIR: only the files of FILES travel back)."""
    root: str

    @property
    def bench(self):
        return os.path.join(self.root, "bench")

    @property
    def tree(self):
        return os.path.join(self.root, "tree")

    @property
    def site(self):
        return os.path.join(self.root, "site")

    @property
    def ncu_report(self):
        return os.path.join(self.root, "kernels")   # ncu adds .ncu-rep


def stages(py, out, work, jobs):
    """The stages with their commands (py: this machine's python with torch; out: DIR)."""
    xdist = _has_module(py, "xdist")
    parallel = (lambda n: ["-n", str(n)]) if xdist else (lambda n: [])
    pytest = [py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]
    shared = ["python_tests/test_cosine_softmax.py", "python_tests/test_agent_losses.py"]
    sanitizer = [find_tool("compute-sanitizer"), "--error-exitcode", "1", "--print-limit", "20"]
    smoke_ops = [py, "scripts/gpu_smoke_ops.py", "--device", "cuda", "--quick"]
    bench = [py, "-m", "normface_kernels.bench", "--out", work.bench, "--no-progress"]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    carried = carried_build(py)
    build = ([[py, "-c", f"print({'KEY extension not rebuilt: ' + carried!r})"]] if carried
             else [[py, "setup.py", "build_ext", "--inplace"]])
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    needs_build = ("build",)
    # The checks' lanes run side by side on 16 cores: a few OpenMP threads per process each.
    shared_cpu = dict(OMP_NUM_THREADS="2")
    return [
        Stage("build", 300, build, "build.log", dict(MAX_JOBS=str(jobs), TORCH_CUDA_ARCH_LIST=arch),
              f"extension for sm_{arch.replace('.', '')}, MAX_JOBS={jobs}", carried=carried),
        Stage("cuda-resources", 60, [[py, "scripts/cuda_resource_check.py", "--log",
                                      os.path.join(out, "build.log")]], "build.log",
              what="no local memory in any CUDA kernel (sm_90)", after=needs_build,
              skip_why="the extension was not rebuilt (no ptxas log)" if carried else ""),
        # The short smoke checks first: cuda-tests takes what is left of the phase.
        Stage("sync-graph", 60, [[py, "scripts/gpu_smoke_graph.py"]], "cuda.log", shared_cpu,
              after=needs_build),
        Stage("nccl", 45, [[py, "scripts/gpu_smoke_nccl.py", "--device", "cuda"]], "cuda.log",
              shared_cpu, after=needs_build),
        # The property-based fuzz's CUDA cases too (random shapes, margins, dtypes, NaN rows
        # against the float64 reference; hypothesis is on the project's GPU machine), and the
        # scenarios every backend shares (conftest's `backend` fixture).
        Stage("cuda-tests", 240, [pytest + ["python_tests/test_cuda_backend.py",
                                            "python_tests/test_cuda_registration.py"]
                                  + parallel(4),
                                  pytest + shared + ["-k", "cuda"] + parallel(4),
                                  pytest + ["python_tests/test_fuzz.py", "-k", "cuda"]
                                  + parallel(4)], "cuda.log", shared_cpu, after=needs_build),
        Stage("triton-tests", 300, [[py, "setup.py", "build_ext", "--inplace"],
                                    pytest + ["python_tests/test_triton.py",
                                              "python_tests/test_triton_registration.py"]
                                    + parallel(min(jobs // 2, 8)),
                                    pytest + shared + ["-k", "triton"]
                                    + parallel(min(jobs // 2, 8))], "triton.log",
              dict(shared_cpu, NORMFACE_NO_CUDA="1", MAX_JOBS=str(max(1, jobs // 2))),
              "in a copy of the tree, CPU-only extension", lane="triton", cwd=work.tree),
        Stage("peers", 60, [[py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                             "--no-compile", "--no-cache-dir", "--upgrade", "--target", work.site]
                            + wheels], "sanitizer.log", lane="sanitizer",
              what=", ".join(os.path.basename(w) for w in wheels),
              skip_why="" if wheels else "no wheels in .whl/ (make gpu-wheels)"),
        Stage("memcheck", 120, [sanitizer + ["--tool", "memcheck"] + smoke_ops
                                + ["--backends", "cuda,triton"]], "sanitizer.log",
              dict(shared_cpu, PYTORCH_NO_CUDA_MEMORY_CACHING="1"), lane="sanitizer",
              after=needs_build),
        Stage("racecheck", 90, [sanitizer + ["--tool", "racecheck"] + smoke_ops
                                + ["--backends", "cuda"]], "sanitizer.log", shared_cpu,
              lane="sanitizer", after=needs_build),
        # The target's size first; the benchmark writes its CSV and markdown after each size,
        # so a timeout keeps the sizes measured (bench/cosine-softmax-bf16.*). It needs the
        # build (backend cuda) and the peers, which --only brings along.
        Stage("bench-rows", 165, [bench + [
            "--device", "cuda", "--ops", "normface", "--passes", "fwd_bwd", "--B", "1024",
            "--D", "512", "--C", ",".join(str(c) for c in BENCH_CLASSES), "--dtypes",
            "bfloat16", "--backends", "triton,cuda,gemm_floor,reference,torch_compile,"
            "liger_flce,cce", "--compile", "--no-targets", "--name", "cosine-softmax-bf16"]],
              "bench.log", lane="measure", requires=("build", "peers"), min_seconds=60,
              what="B=1024, D=512, C=" + ", ".join(f"{c:,}" for c in BENCH_CLASSES)),
        Stage("profile", 60, [[py, "scripts/gpu_profile.py", "--out", work.bench]], "bench.log",
              lane="measure", requires=needs_build, min_seconds=30,
              what="ceilings, and every kernel of a step at C=1M"),
        # Only the kernels the profile has a cost model for (about 25 launches, not 250); not
        # started with less than a minute left (ncu writes its report only at the end).
        Stage("ncu", 90, [[find_tool("ncu"), "--clock-control", "none", "--profile-from-start",
                           "off", "--kernel-name", f"regex:{ncu_kernels_regex()}",
                           "--launch-count", "64", "--export", work.ncu_report,
                           "--force-overwrite"]
                          + [a for s in NCU_SECTIONS for a in ("--section", s)]
                          + [py, "scripts/gpu_profile.py", "--ncu"],
                          [py, "scripts/gpu_check.py", "--ncu-table",
                           work.ncu_report + ".ncu-rep", work.bench]], "bench.log",
              lane="measure", requires=needs_build, min_seconds=60,
              what="one step of each backend under Nsight Compute"),
    ]


def ncu_kernels_regex():
    """The kernels scripts/kernel_costs.py has a cost model for (no torch needed)."""
    spec = importlib.util.spec_from_file_location(
        "kernel_costs", os.path.join(ROOT, "scripts", "kernel_costs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NCU_REGEX


def find_tool(name):
    """A CUDA tool on PATH or in the toolkit's usual places (the bare name if none is found)."""
    if shutil.which(name):
        return shutil.which(name)
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    homes += sorted(glob.glob("/opt/nvidia/nsight-compute/*"), reverse=True)
    for home in filter(None, homes):
        for candidate in (os.path.join(home, "bin", name), os.path.join(home, name, name),
                          os.path.join(home, name)):
            if os.path.isfile(candidate):
                return candidate
    return name


def _has_module(py, name):
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([py, "-c", code], capture_output=True).returncode == 0


def stage_env(stage, work):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [stage.cwd] + ([work.site] if os.path.isdir(work.site) else [])
    paths += [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(stage.env)
    return env


def _missing_paths(stage):
    """Repository files a stage's commands name that do not exist (the dry run checks them)."""
    return [a for cmd in stage.commands for a in cmd
            if isinstance(a, str) and re.match(r"^(scripts|python_tests)/\S+\.py$", a)
            and not os.path.exists(os.path.join(ROOT, a))]


# ---------------------------------------------------------------------------------------------
# A carried build, the Triton lane's tree
# ---------------------------------------------------------------------------------------------

def source_digest(root=ROOT):
    """What the extension is built from: every file of csrc/ and setup.py."""
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True))
    for path in files + [os.path.join(root, "setup.py")]:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _python_tags(py):
    """(extension suffix, torch version) of py, e.g. ('.cpython-312-x86_64-linux-gnu.so',
    '2.11.0+cu130'); (None, None) when py has no torch."""
    code = ("import sysconfig, torch; "
            "print(sysconfig.get_config_var('EXT_SUFFIX')); print(torch.__version__)")
    run = subprocess.run([py, "-c", code], capture_output=True, text=True)
    lines = run.stdout.split()
    return (lines[0], lines[1]) if run.returncode == 0 and len(lines) == 2 else (None, None)


def carried_build(py, carried=CARRIED_EXT, root=ROOT):
    """A description of the build in `carried` if it is of today's csrc/ for py's torch and
    Python (then it is used instead of building), else ''."""
    if not os.path.isdir(carried):
        return ""
    suffix, torch_version = _python_tags(py)
    so = os.path.join(carried, "_C" + (suffix or ".none"))
    try:
        with open(os.path.join(carried, "SOURCES")) as f:
            sources = f.read().strip()
        with open(os.path.join(carried, "_build_info.py")) as f:
            info = f.read()
    except OSError:
        return ""
    if not (os.path.isfile(so) and sources == source_digest(root)
            and f"TORCH = {torch_version!r}" in info and "CUDA = True" in info):
        return ""
    return f"{os.path.basename(so)} from .gpu-ext, built from this csrc/ for torch {torch_version}"


def install_carried_build(carried=CARRIED_EXT, package=os.path.join(ROOT, "normface_kernels")):
    for name in os.listdir(carried):
        if name.startswith("_C") or name == "_build_info.py":
            shutil.copy2(os.path.join(carried, name), os.path.join(package, name))


def make_snapshot(tree, exclude=()):
    """A copy of the repository (sources and tests, no builds or results) at `tree`."""
    exclude = {os.path.abspath(p) for p in exclude}

    def ignore(folder, names):
        return [n for n in names if n in SNAPSHOT_IGNORE or n.endswith((".so", ".pyc"))
                or os.path.abspath(os.path.join(folder, n)) in exclude]
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(ROOT, tree, ignore=ignore, symlinks=True)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _run(cmd, env, timeout, log, cwd=ROOT):
    """Runs cmd in its own process group (a timeout kills its children too: pytest workers,
    the program under compute-sanitizer). Returns the exit status, or None on a timeout."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as error:   # e.g. a tool that is not there: a failed stage, not a crash
        log.write(f"cannot run {cmd[0]}: {error}\n")
        log.flush()
        return 127
    try:
        return proc.wait(timeout=max(1, timeout))
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        return None


class DriverLog:
    """gpu-check.log and the console, written by several lanes at once."""

    def __init__(self, path):
        self.file = open(path, "w")
        self.lock = threading.Lock()

    def write(self, text, console=False):
        with self.lock:
            self.file.write(text)
            self.file.flush()
            if console:
                print(text.rstrip("\n"), flush=True)

    def close(self):
        self.file.close()


def run_stage(stage, out, deadline, driver_log, work=None):
    work = work or Work(tempfile.gettempdir())
    left = deadline - time.monotonic() - RESERVE
    unmet = [s.name for s in stage.waits_for if not s.status.startswith("passed")]
    if stage.skip_why or unmet:
        stage.status = f"skipped ({stage.skip_why or ', '.join(unmet) + ' did not pass'})"
        return
    if left < stage.min_seconds:
        stage.status = f"skipped (budget: {max(0, left):.0f} s left)"
        return
    timeout = min(stage.cap, left)
    start = time.monotonic()
    stage.status = "running"
    with open(os.path.join(out, stage.log), "a") as log:
        for cmd in stage.commands:
            line = shlex.join(cmd)
            header = f"\n==== {stage.name}: {line}\n"
            log.write(header)
            log.flush()
            driver_log.write(header)
            remaining = timeout - (time.monotonic() - start)
            rc = (_run(cmd, stage_env(stage, work), remaining, log, stage.cwd)
                  if remaining > 1 else None)
            driver_log.write(f"     exit {rc if rc is not None else 'TIMEOUT'} after "
                             f"{time.monotonic() - start:.0f} s (cap {timeout:.0f} s)\n")
            if rc is None:
                stage.status = f"TIMED OUT ({timeout:.0f} s)"
                log.write(f"\n==== {stage.name}: timed out after {timeout:.0f} s\n")
                break
            if rc != 0:
                stage.status = f"FAILED (exit {rc})"
                break
        else:
            stage.status = "passed"
    stage.seconds = time.monotonic() - start
    with open(os.path.join(out, stage.log)) as f:
        text = f.read()
    # This stage's part of the log (several stages share a log file).
    first = f"==== {stage.name}: {shlex.join(stage.commands[0])}"
    stage.key = key_numbers(stage, text[text.rfind(first):])


def run_lane(lane, out, deadline, driver_log, work):
    """The stages of one lane in order, each after the stages it waits for have ended."""
    for stage in lane:
        for other in stage.waits_for:
            other.done.wait(max(0.0, deadline - time.monotonic()))
        driver_log.write(f"== {stage.name} (cap {stage.cap} s, {stage.lane} lane)\n", True)
        try:
            run_stage(stage, out, deadline, driver_log, work)
        finally:
            stage.done.set()
        driver_log.write(f"   {stage.name}: {stage.status} in {stage.seconds:.0f} s"
                         + (f": {stage.key[0]}" if stage.key else "") + "\n", True)


def run_all(chosen, out, work, budget, driver_log):
    """The checks phase (lanes side by side, until the measure phase's time), then the measure
    phase (one stage at a time)."""
    started = time.monotonic()
    by_name = {s.name: s for s in chosen}
    for stage in chosen:
        stage.waits_for = [by_name[n] for n in stage.after if n in by_name]
    measure = [s for s in chosen if s.lane == "measure"]
    keep = min(MEASURE_SECONDS, sum(s.cap for s in measure), budget // 2)
    checks_deadline = started + budget - keep
    lanes = {}
    for stage in chosen:
        if stage.lane != "measure":
            lanes.setdefault(stage.lane, []).append(stage)
    threads = [threading.Thread(target=run_lane, args=(lane, out, checks_deadline, driver_log,
                                                      work), daemon=True)
               for lane in lanes.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run_lane(measure, out, started + budget, driver_log, work)


# ---------------------------------------------------------------------------------------------
# Key numbers for the summary
# ---------------------------------------------------------------------------------------------

def _pytest_counts(text):
    final = re.findall(r"^=+ (.*\d+ (?:passed|failed|error|skipped).*) in [\d.]+s", text, re.M)
    if final:
        return [final[-1]]
    counts = {k: len(re.findall(rf"\b{k}\b", text)) for k in ("PASSED", "FAILED", "ERROR",
                                                               "SKIPPED")}
    return ["(no final line) " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)]


def key_numbers(stage, text):
    """A few lines per stage for the summary."""
    lines = [m for m in re.findall(r"^KEY (.*)$", text, re.M)]
    if stage.name.endswith("-tests"):
        lines += _pytest_counts(text)
        lines += [f"  {m}" for m in re.findall(r"^FAILED (\S+)", text, re.M)[:8]]
    elif stage.name == "build":
        lines += re.findall(r"^normface_kernels: (.*)$", text, re.M)[:1]
        lines += [m for m in re.findall(r"^(.*error.*)$", text, re.M | re.I)][:3]
    elif stage.name == "cuda-resources":
        lines += re.findall(r"^(\d+ kernels, max registers.*)$", text, re.M)
        lines += re.findall(r"^(cuda_resource_check.*)$", text, re.M)
    elif stage.name in ("memcheck", "racecheck"):
        lines += re.findall(r"(ERROR SUMMARY: .*)$", text, re.M)[-1:]
        lines += re.findall(r"^(RACECHECK SUMMARY: .*)$", text, re.M)[-1:]
    elif stage.name.startswith("bench"):
        lines += [m for m in re.findall(r"^\s*(\[(?:PASS|FAIL|CHECK)\].*)$", text, re.M)]
    if stage.status != "passed" and not lines:
        tail = [line for line in text.strip().splitlines() if line.strip()][-4:]
        lines += [f"  | {line[:150]}" for line in tail]
    return lines


def _bench_table(out):
    """The cosine_softmax rows of the benchmark's stdout (for the summary)."""
    path = os.path.join(out, "bench.log")
    if not os.path.exists(path):
        return []
    rows, header = [], []
    for section in open(path).read().split("\n==== "):
        if section.startswith("bench-rows:"):
            lines = section.splitlines()
            header = header or [r for r in lines if re.match(r"^op\s", r)][:1]
            rows += [r for r in lines if re.search(r"\d\.\d+x\s", r)]
    return header + rows[:24]


def write_summary(out, all_stages, info, started, budget):
    lines = ["# GPU check", "",
             f"{info}", "",
             f"total {time.monotonic() - started:.0f} s (budget {budget} s)", "",
             "| stage | lane | status | s | key numbers |", "|---|---|---|---:|---|"]
    for s in all_stages:
        first = s.key[0] if s.key else ""
        lines.append(f"| {s.name} | {s.lane} | {s.status} | {s.seconds:.0f} | {first} |")
    lines.append("")
    for s in all_stages:
        if len(s.key) > 1:
            lines.append(f"**{s.name}**")
            lines += [f"    {k}" for k in s.key[1:12]]
            lines.append("")
    table = _bench_table(out)
    if table:
        lines += ["**cosine_softmax bf16 fwd+bwd, B=1024, D=512** (bench.log)", "```"]
        lines += table + ["```", ""]
    lines.append("Logs: " + ", ".join(f for f in FILES[1:] if os.path.exists(
        os.path.join(out, f))))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def cap_files(out):
    """Every file in DIR under the device tool's 16 MiB: keep the head and the tail."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isfile(path) and os.path.getsize(path) > MAX_FILE and name.endswith(".log"):
            with open(path, "rb") as f:
                head = f.read(MAX_FILE // 4)
                f.seek(-(MAX_FILE // 2), os.SEEK_END)
                tail = f.read()
            with open(path, "wb") as f:
                f.write(head + b"\n\n[... cut to fit 16 MiB ...]\n\n" + tail)


def pack_results(out, bench_dir, package=None):
    """results.tar.gz: bench/ (the benchmark's files, profile and ncu tables) and, when a build
    was made, ext/ (the extension and _build_info.py of `package`, with SOURCES, the digest of
    what they were built from); without ext/ if that would pass 16 MiB."""
    path = os.path.join(out, "results.tar.gz")
    build, sources = [], b""
    if package:
        build = sorted(glob.glob(os.path.join(package, "_C*.so"))) + [
            os.path.join(package, "_build_info.py")]
        sources = (source_digest() + "\n").encode()
    for with_build in (bool(build), False):
        with tarfile.open(path, "w:gz") as tar:
            if os.path.isdir(bench_dir):
                for name in sorted(os.listdir(bench_dir)):
                    tar.add(os.path.join(bench_dir, name), arcname=f"bench/{name}")
            if with_build:
                info = tarfile.TarInfo("ext/SOURCES")
                info.size = len(sources)
                tar.addfile(info, io.BytesIO(sources))
                for name in filter(os.path.isfile, build):
                    tar.add(name, arcname=f"ext/{os.path.basename(name)}")
        if os.path.getsize(path) <= MAX_FILE:
            break


def machine_info(py):
    code = ("import torch, platform; import triton; "
            "p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
            "print(f'python {platform.python_version()}, torch {torch.__version__}, triton "
            "{triton.__version__}, GPU: ' + (f'{p.name}, {p.multi_processor_count} SMs, "
            "sm_{p.major}{p.minor}' if p else 'none'))")
    run = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120)
    gpu = run.stdout.strip() or f"torch probe failed: {run.stderr.strip()[-300:]}"
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",)
                                         if os.path.exists(p)), None)
    if nvcc:
        ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        gpu += ", nvcc " + (re.findall(r"release ([\d.]+)", ver) or ["?"])[0]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,"
                              "temperature.gpu,memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        gpu += f", driver/SM clock/max/temp/mem used: {smi.stdout.strip()}"
    return gpu + f", {os.cpu_count()} CPUs"


def has_gpu(py):
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    try:
        run = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    if run.returncode == 0:
        return True, ""
    return False, (run.stderr.strip().splitlines() or ["torch.cuda.is_available() is False"])[-1]


# ---------------------------------------------------------------------------------------------
# Nsight Compute's table
# ---------------------------------------------------------------------------------------------

def ncu_kernels(csv_text):
    """One dict per profiled launch from `ncu --csv --page details`: kernel name, and the
    metrics of NCU_METRICS (value with its unit)."""
    launches = {}
    lines = csv_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), len(lines))
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        launch_id = row.get("ID")
        if launch_id is None or not row.get("Kernel Name"):
            continue
        entry = launches.setdefault(launch_id, {"kernel": row["Kernel Name"]})
        for field_name in ("Grid Size", "Block Size"):
            if row.get(field_name):
                entry[NCU_METRICS[field_name]] = row[field_name]
        name = NCU_METRICS.get(row.get("Metric Name", ""))
        if name:
            unit = row.get("Metric Unit", "")
            entry[name] = row.get("Metric Value", "") + (f" {unit}" if unit else "")
    return list(launches.values())


def ncu_table(report, bench_dir):
    """Exports an ncu report to bench_dir/ncu.csv and prints one line per kernel name (its
    first launch): duration, SM and memory throughput, occupancy, registers."""
    ncu = find_tool("ncu")
    run = subprocess.run([ncu, "--import", report, "--csv", "--page", "details",
                          "--print-kernel-base", "function"], capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stdout[-2000:], run.stderr[-2000:])
        return 1
    os.makedirs(bench_dir, exist_ok=True)
    with open(os.path.join(bench_dir, "ncu.csv"), "w") as f:
        f.write(run.stdout)
    launches = ncu_kernels(run.stdout)
    first, count = {}, collections.Counter(launch["kernel"] for launch in launches)
    for launch in launches:
        first.setdefault(launch["kernel"], launch)
    columns = list(NCU_METRICS.values())
    print("kernel (first launch) | launches | " + " | ".join(columns))
    for name, launch in first.items():
        print(f"{name} | {count[name]} | " + " | ".join(launch.get(c, "") for c in columns))
    print(f"KEY ncu: {len(launches)} launches of {len(first)} kernels profiled (ncu.csv)")
    return 0


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 scripts/gpu_check.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="gpu-check-out", help="DIR for the results")
    parser.add_argument("--dry-run", action="store_true", help="print the stages, run nothing")
    parser.add_argument("--budget", type=int, default=int(os.environ.get("GPU_CHECK_BUDGET",
                                                                         BUDGET)))
    parser.add_argument("--only", default="", help="comma-separated stage names")
    parser.add_argument("--skip", default="", help="comma-separated stage names")
    parser.add_argument("--python", default=sys.executable, help="python with torch")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rehearse", action="store_true",
                        help="without a GPU: run everything but print each command instead of "
                             "running it (the orchestration, the tree copy and the packing)")
    parser.add_argument("--ncu-table", nargs=2, metavar=("REPORT", "DIR"),
                        help="(the ncu stage) export an ncu report's details to DIR/ncu.csv")
    args = parser.parse_args(argv)
    if args.ncu_table:
        return ncu_table(*args.ncu_table)

    out = os.path.abspath(args.out)
    work = Work(os.path.join(tempfile.gettempdir(), "normface-gpu-check"))
    all_stages = stages(args.python, out, work, args.jobs)
    names = [s.name for s in all_stages]
    for option in (args.only, args.skip):
        unknown = [n for n in option.split(",") if n and n not in names]
        if unknown:
            parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(names)}")
    only = {n for n in args.only.split(",") if n}
    for stage in all_stages:   # --only brings along what a chosen stage needs (the build...)
        if stage.name in only:
            only.update(stage.requires)
    chosen = [s for s in all_stages if (not only or s.name in only)
              and s.name not in args.skip.split(",")]

    if args.dry_run:
        print(f"gpu-check dry run: {len(chosen)} stages, budget {args.budget} s "
              f"({MEASURE_SECONDS} s kept for the measure phase), results in {out} "
              f"({', '.join(FILES)})")
        missing = []
        for s in chosen:
            where = f", in {s.cwd}" if s.cwd != ROOT else ""
            print(f"\n[{s.name}] {s.lane} lane, cap {s.cap} s -> {s.log}{where}"
                  + (f"  ({s.what})" if s.what else "")
                  + (f"  after {', '.join(s.after)}" if s.after else ""))
            if s.skip_why:
                print(f"  skipped: {s.skip_why}")
            for cmd in s.commands:
                extra = " ".join(f"{k}={v}" for k, v in s.env.items())
                print(f"  $ {extra + ' ' if extra else ''}{shlex.join(cmd)}")
            missing += _missing_paths(s)
        if missing:
            print(f"\nmissing files named by the stages: {missing}")
            return 1
        return 0

    os.makedirs(out, exist_ok=True)
    ok, why = (True, "") if args.rehearse else has_gpu(args.python)
    if args.rehearse:
        echo = [sys.executable, "-c", "import sys; print('KEY would run', *sys.argv[1:3])"]
        for stage in chosen:
            stage.commands = [echo + cmd for cmd in stage.commands]
    if not ok:
        message = (f"gpu-check: no CUDA GPU here ({why}). It must run on a GPU machine; "
                   "`python3 scripts/gpu_check.py --dry-run` shows what it would run.")
        print(message)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(f"# GPU check\n\nNOT RUN: {message}\n")
        return 2

    started = time.monotonic()
    shutil.rmtree(work.root, ignore_errors=True)
    os.makedirs(work.bench)
    for name in FILES:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if all_stages[0].carried:   # also when the build stage is not chosen
        install_carried_build()
    if any(s.lane == "triton" for s in chosen):
        make_snapshot(work.tree, exclude=[out])
    info = machine_info(args.python)
    print(f"gpu-check: {info}; {len(chosen)} stages, budget {args.budget} s -> {out}",
          flush=True)

    driver_log = DriverLog(os.path.join(out, "gpu-check.log"))
    driver_log.write(f"{info}\n")
    try:
        run_all(chosen, out, work, args.budget, driver_log)
    finally:   # whatever happened, what was measured travels back
        driver_log.close()
        built = any(s.name == "build" and s.status == "passed" and not s.carried
                    for s in chosen)
        pack_results(out, work.bench, os.path.join(ROOT, "normface_kernels") if built else None)
        cap_files(out)
        summary = write_summary(out, chosen, info, started, args.budget)
        print("\n".join(summary))
    return 0 if all(s.status.startswith("passed") or s.skip_why for s in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
