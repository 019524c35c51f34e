"""The whole GPU validation in one command, on a GPU machine (about 9 minutes on one H200 with 16
cores, the build included; the machine needs no package registry: python3 with torch, triton,
pytest, nvcc and compute-sanitizer, as on this project's H200):

    make gpu-check DIR=out                   # or: python3 scripts/gpu_check.py out
    python3 scripts/gpu_check.py out --dry-run   # every stage's commands, runs nothing
    python3 scripts/gpu_check.py out --only build,cuda-tests --budget 300

Stages, in order; each has its own time cap inside an overall budget (--budget, default 540 s),
and a failing or timed-out stage does not stop the later ones:
    build          the extension against this machine's torch (MAX_JOBS=nproc, sm_90, ptxas -v)
    cuda-resources registers / spills / stack of every CUDA kernel (scripts/cuda_resource_check)
    cuda-tests     python_tests/test_cuda_*.py and the shared scenarios' cuda cases on the GPU
    triton-tests   python_tests/test_triton*.py and the shared scenarios' triton cases, compiled
                   (no interpreter)
    sync-graph     a training step under torch.cuda.set_sync_debug_mode("error") with the data
                   checks off, and its capture and replay in a CUDA graph (scripts/gpu_smoke_graph)
    nccl           a 1-rank NCCL ShardedNormFaceLoss step against NormFaceLoss (gpu_smoke_nccl)
    bench-rows     cosine_softmax (normface) bf16 fwd+bwd, B=1024, D=512, C=16k/128k/1M: triton,
                   cuda, gemm_floor, eager (reference) and torch.compile
    bench-targets  the benchmark's targets (CPU measurements, side by side)
    memcheck       compute-sanitizer memcheck on a small set of CUDA op calls (gpu_smoke_ops)
    racecheck      compute-sanitizer racecheck on the same calls

DIR receives at most 8 files, each at most 16 MiB, no sub-folders: summary.md (one page, written
last), gpu-check.log (every command, its time and exit status), build.log, tests.log,
smoke.log, sanitizer.log, bench.log, bench.tar.gz (the benchmark's CSV/markdown/PNG).
Without a CUDA GPU it stops at once with a message (exit 2); exit 1 if any stage did not pass.
"""

import argparse
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE = 16 * 2 ** 20 - 2 ** 16  # the device tool brings back files up to 16 MiB
FILES = ("summary.md", "gpu-check.log", "build.log", "tests.log", "smoke.log", "sanitizer.log",
         "bench.log", "bench.tar.gz")
RESERVE = 15  # seconds kept for the summary
BENCH_CLASSES = (16_384, 131_072, 1_048_576)


@dataclass
class Stage:
    name: str
    cap: int                  # seconds
    commands: list            # [[arg, ...], ...] run one after the other
    log: str                  # file in DIR
    env: dict = field(default_factory=dict)
    what: str = ""
    # filled in by run_stage
    status: str = "not run"
    seconds: float = 0.0
    key: list = field(default_factory=list)


def stages(py, out, bench_dir, jobs):
    """The stages with their commands (py: this machine's python with torch; out: DIR)."""
    xdist = _has_module(py, "xdist")
    parallel = (lambda n: ["-n", str(n)]) if xdist else (lambda n: [])
    pytest = [py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]
    shared = ["python_tests/test_cosine_softmax.py", "python_tests/test_agent_losses.py"]
    sanitizer = [find_tool("compute-sanitizer"), "--error-exitcode", "1", "--print-limit", "20"]
    smoke_ops = [py, "scripts/gpu_smoke_ops.py", "--device", "cuda", "--backends", "cuda"]
    bench = [py, "-m", "normface_kernels.bench", "--out", bench_dir, "--no-progress"]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    return [
        Stage("build", 300, [[py, "setup.py", "build_ext", "--inplace"]], "build.log",
              dict(MAX_JOBS=str(jobs), TORCH_CUDA_ARCH_LIST=arch),
              f"extension for sm_{arch.replace('.', '')}, MAX_JOBS={jobs}"),
        Stage("cuda-resources", 60, [[py, "scripts/cuda_resource_check.py", "--log",
                                      os.path.join(out, "build.log")]], "build.log",
              what="no local memory in any CUDA kernel (sm_90)"),
        # The property-based fuzz's CUDA cases too (random shapes, margins, dtypes, NaN rows
        # against the float64 reference; hypothesis is on the project's GPU machine).
        # The scenarios every backend shares (conftest's `backend` fixture) run in
        # test_cosine_softmax.py and test_agent_losses.py: their cuda / triton cases here.
        Stage("cuda-tests", 210, [pytest + ["python_tests/test_cuda_backend.py",
                                            "python_tests/test_cuda_registration.py"]
                                  + parallel(4),
                                  pytest + shared + ["-k", "cuda"] + parallel(4),
                                  pytest + ["python_tests/test_fuzz.py", "-k", "cuda"]
                                  + parallel(4)], "tests.log"),
        Stage("triton-tests", 180, [pytest + ["python_tests/test_triton.py",
                                              "python_tests/test_triton_registration.py"]
                                    + parallel(min(jobs, 8)),
                                    pytest + shared + ["-k", "triton"]
                                    + parallel(min(jobs, 8))], "tests.log"),
        Stage("sync-graph", 120, [[py, "scripts/gpu_smoke_graph.py"]], "smoke.log"),
        Stage("nccl", 90, [[py, "scripts/gpu_smoke_nccl.py", "--device", "cuda"]], "smoke.log"),
        # One run per C: a timeout loses only the sizes not yet measured.
        Stage("bench-rows", 240, [bench + [
            "--device", "cuda", "--ops", "normface", "--passes", "fwd_bwd", "--B", "1024",
            "--D", "512", "--C", str(c), "--dtypes", "bfloat16", "--backends",
            "triton,cuda,gemm_floor,reference,torch_compile", "--compile", "--no-targets",
            "--name", f"cosine-softmax-bf16-C{c}"] for c in BENCH_CLASSES], "bench.log",
              what="B=1024, D=512, C=" + ", ".join(f"{c:,}" for c in BENCH_CLASSES)),
        Stage("bench-targets", 120, [bench + ["--targets-only", "--device", "cpu", "--name",
                                              "targets"]], "bench.log",
              what="the foundation targets (CPU measurements)"),
        Stage("memcheck", 120, [sanitizer + ["--tool", "memcheck"] + smoke_ops], "sanitizer.log",
              dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1")),
        Stage("racecheck", 120, [sanitizer + ["--tool", "racecheck"] + smoke_ops + ["--quick"]],
              "sanitizer.log"),
    ]


def find_tool(name):
    """A CUDA tool on PATH or in the toolkit's usual places (the bare name if none is found)."""
    if shutil.which(name):
        return shutil.which(name)
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        for candidate in (os.path.join(home, "bin", name), os.path.join(home, name, name)):
            if os.path.exists(candidate):
                return candidate
    return name


def _has_module(py, name):
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([py, "-c", code], capture_output=True).returncode == 0


def stage_env(stage):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(stage.env)
    return env


def _missing_paths(stage):
    """Repository files a stage's commands name that do not exist (the dry run checks them)."""
    return [a for cmd in stage.commands for a in cmd
            if isinstance(a, str) and re.match(r"^(scripts|python_tests)/\S+\.py$", a)
            and not os.path.exists(os.path.join(ROOT, a))]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _run(cmd, env, timeout, log):
    """Runs cmd in its own process group (a timeout kills its children too: pytest workers,
    the program under compute-sanitizer). Returns the exit status, or None on a timeout."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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


def run_stage(stage, out, deadline, driver_log):
    left = deadline - time.monotonic() - RESERVE
    if left < 10:
        stage.status = "skipped (budget)"
        return
    timeout = min(stage.cap, left)
    start = time.monotonic()
    stage.status = "passed"
    with open(os.path.join(out, stage.log), "a") as log:
        for cmd in stage.commands:
            line = shlex.join(cmd)
            header = f"\n==== {stage.name}: {line}\n"
            log.write(header)
            log.flush()
            driver_log.write(header)
            remaining = timeout - (time.monotonic() - start)
            rc = _run(cmd, stage_env(stage), remaining, log) if remaining > 1 else None
            driver_log.write(f"     exit {rc if rc is not None else 'TIMEOUT'} after "
                             f"{time.monotonic() - start:.0f} s (cap {timeout:.0f} s)\n")
            driver_log.flush()
            if rc is None:
                stage.status = f"TIMED OUT ({timeout:.0f} s)"
                log.write(f"\n==== {stage.name}: timed out after {timeout:.0f} s\n")
                break
            if rc != 0:
                stage.status = f"FAILED (exit {rc})"
                break
    stage.seconds = time.monotonic() - start
    with open(os.path.join(out, stage.log)) as f:
        text = f.read()
    # This stage's part of the log (several stages share a log file).
    first = f"==== {stage.name}: {shlex.join(stage.commands[0])}"
    stage.key = key_numbers(stage, text[text.rfind(first):])


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
        lines += [m for m in re.findall(r"^\s*(\[(?:PASS|FAIL)\].*)$", text, re.M)]
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
             "| stage | status | s | key numbers |", "|---|---|---:|---|"]
    for s in all_stages:
        first = s.key[0] if s.key else ""
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {first} |")
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


def pack_bench(out, bench_dir):
    files = sorted(os.listdir(bench_dir)) if os.path.isdir(bench_dir) else []
    if files:
        with tarfile.open(os.path.join(out, "bench.tar.gz"), "w:gz") as tar:
            for name in files:
                tar.add(os.path.join(bench_dir, name), arcname=name)


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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 scripts/gpu_check.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="gpu-check-out", help="DIR for the results")
    parser.add_argument("--dry-run", action="store_true", help="print the stages, run nothing")
    parser.add_argument("--budget", type=int, default=int(os.environ.get("GPU_CHECK_BUDGET",
                                                                         540)))
    parser.add_argument("--only", default="", help="comma-separated stage names")
    parser.add_argument("--skip", default="", help="comma-separated stage names")
    parser.add_argument("--python", default=sys.executable, help="python with torch")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    bench_dir = os.path.join(tempfile.gettempdir(), "normface-gpu-check-bench")
    all_stages = stages(args.python, out, bench_dir, args.jobs)
    names = [s.name for s in all_stages]
    for option in (args.only, args.skip):
        unknown = [n for n in option.split(",") if n and n not in names]
        if unknown:
            parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(names)}")
    chosen = [s for s in all_stages if (not args.only or s.name in args.only.split(","))
              and s.name not in args.skip.split(",")]

    if args.dry_run:
        print(f"gpu-check dry run: {len(chosen)} stages, budget {args.budget} s, results in "
              f"{out} ({', '.join(FILES)})")
        missing = []
        for s in chosen:
            print(f"\n[{s.name}] cap {s.cap} s -> {s.log}" + (f"  ({s.what})" if s.what else ""))
            for cmd in s.commands:
                extra = " ".join(f"{k}={v}" for k, v in s.env.items())
                print(f"  $ {extra + ' ' if extra else ''}{shlex.join(cmd)}")
            missing += _missing_paths(s)
        if missing:
            print(f"\nmissing files named by the stages: {missing}")
            return 1
        return 0

    os.makedirs(out, exist_ok=True)
    ok, why = has_gpu(args.python)
    if not ok:
        message = (f"gpu-check: no CUDA GPU here ({why}). It must run on a GPU machine; "
                   "`python3 scripts/gpu_check.py --dry-run` shows what it would run.")
        print(message)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(f"# GPU check\n\nNOT RUN: {message}\n")
        return 2

    started = time.monotonic()
    deadline = started + args.budget
    shutil.rmtree(bench_dir, ignore_errors=True)
    for name in FILES:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    info = machine_info(args.python)
    print(f"gpu-check: {info}; {len(chosen)} stages, budget {args.budget} s -> {out}",
          flush=True)
    with open(os.path.join(out, "gpu-check.log"), "w") as driver_log:
        driver_log.write(f"{info}\n")
        for stage in chosen:
            print(f"== {stage.name} (cap {stage.cap} s)", flush=True)
            run_stage(stage, out, deadline, driver_log)
            print(f"   {stage.status} in {stage.seconds:.0f} s"
                  + (f": {stage.key[0]}" if stage.key else ""), flush=True)
    pack_bench(out, bench_dir)
    cap_files(out)
    summary = write_summary(out, chosen, info, started, args.budget)
    print("\n".join(summary))
    return 0 if all(s.status == "passed" for s in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
