"""The GPU check's plumbing without a GPU (scripts/gpu_check.py and its smoke scripts): the dry
run names every stage's commands and files that exist, a machine without a GPU is refused at
once, the results fit what the device tool brings back, and the smoke scripts run on CPU."""

import importlib.util
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("build", "cuda-resources", "cuda-tests", "sync-graph", "nccl", "triton-tests", "peers",
          "memcheck", "racecheck", "bench-rows", "profile", "ncu")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_prints_every_stage_and_its_commands(tmp_path):
    run = _run("scripts/gpu_check.py", str(tmp_path / "out"), "--dry-run")
    assert run.returncode == 0, run.stdout + run.stderr
    for stage in STAGES:
        assert f"[{stage}]" in run.stdout
    for needle in ("setup.py build_ext --inplace", "TORCH_CUDA_ARCH_LIST=9.0",
                   "python_tests/test_cuda_backend.py", "python_tests/test_triton.py",
                   "compute-sanitizer", "--tool memcheck", "--tool racecheck",
                   "scripts/gpu_smoke_graph.py", "scripts/gpu_smoke_nccl.py",
                   "--C 16384", "--C 131072", "--C 1048576", "gemm_floor", "torch_compile",
                   "liger_flce,cce", "scripts/gpu_profile.py", "--clock-control none",
                   "NORMFACE_NO_CUDA=1"):
        assert needle in run.stdout, needle
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_dry_run_selects_stages():
    run = _run("scripts/gpu_check.py", "--dry-run", "--only", "build,nccl")
    assert run.returncode == 0, run.stderr
    assert "[build]" in run.stdout and "[nccl]" in run.stdout
    assert "[cuda-tests]" not in run.stdout
    bad = _run("scripts/gpu_check.py", "--dry-run", "--only", "nope")
    assert bad.returncode != 0 and "unknown stage" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    start = time.monotonic()
    run = _run("scripts/gpu_check.py", str(tmp_path))
    assert run.returncode == 2
    assert "no CUDA GPU" in run.stdout
    assert time.monotonic() - start < 60
    assert "NOT RUN" in (tmp_path / "summary.md").read_text()
    assert os.listdir(tmp_path) == ["summary.md"]


def test_results_fit_the_device_tools_limits(tmp_path):
    gpu_check = _script("gpu_check")
    stages = gpu_check.stages(sys.executable, str(tmp_path), gpu_check.Work(str(tmp_path)), 16)
    assert [s.name for s in stages] == list(STAGES)
    assert {s.log for s in stages} | {"summary.md", "gpu-check.log", "results.tar.gz"} == set(
        gpu_check.FILES)
    assert len(gpu_check.FILES) <= 8
    big = tmp_path / "cuda.log"
    big.write_bytes(b"x" * (17 * 2 ** 20))
    gpu_check.cap_files(str(tmp_path))
    assert big.stat().st_size <= 16 * 2 ** 20
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "rows.csv").write_text("op,C\nnormface,16384\n")
    (tmp_path / ".ext").mkdir()
    (tmp_path / ".ext" / "SOURCES").write_text("abc\n")
    gpu_check.pack_results(str(tmp_path), str(tmp_path / "bench"))
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["bench/rows.csv", "ext/SOURCES"]
    for stage in stages:
        stage.status, stage.seconds, stage.key = "passed", 1.0, ["k"]
    stages[2].status = "TIMED OUT (150 s)"
    lines = gpu_check.write_summary(str(tmp_path), stages, "machine", time.monotonic(), 540)
    assert len(lines) < 80
    assert "| cuda-tests | cuda | TIMED OUT (150 s) |" in (tmp_path / "summary.md").read_text()
    files = [f for f in os.listdir(tmp_path) if os.path.isfile(tmp_path / f)]
    assert set(files) <= set(gpu_check.FILES)


def test_key_numbers_of_pytest_logs_also_after_a_timeout():
    gpu_check = _script("gpu_check")
    stage = gpu_check.Stage("cuda-tests", 1, [["x"]], "tests.log", status="passed")
    done = "...\nFAILED python_tests/a.py::t - boom\n==== 1 failed, 9 passed in 3.2s ====\n"
    assert gpu_check.key_numbers(stage, done)[:2] == ["1 failed, 9 passed",
                                                      "  python_tests/a.py::t"]
    cut = "[gw0] PASSED a::x\n[gw1] PASSED a::y\n[gw1] FAILED a::z\n"
    assert gpu_check.key_numbers(stage, cut)[0] == "(no final line) 2 passed, 1 failed"


def test_smoke_scripts_run_on_cpu():
    ops = _run("scripts/gpu_smoke_ops.py", "--device", "cpu", "--backends", "cpu", "--quick")
    assert ops.returncode == 0, ops.stdout + ops.stderr
    assert "0 mismatches" in ops.stdout
    nccl = _run("scripts/gpu_smoke_nccl.py", "--device", "cpu", "--backends", "cpu")
    assert nccl.returncode == 0, nccl.stdout + nccl.stderr
    assert "gloo 1-rank" in nccl.stdout and "0 mismatches" in nccl.stdout
    if not torch.cuda.is_available():
        graph = _run("scripts/gpu_smoke_graph.py")
        assert graph.returncode == 2 and "needs a CUDA GPU" in graph.stdout, graph.stderr


def test_cuda_resource_check_fails_on_local_memory(tmp_path):
    check = _script("cuda_resource_check")
    log = """ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_80'
ptxas info    : Function properties for _Z4goodPf
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_90a'
ptxas info    : Function properties for _Z5spillPf
    64 bytes stack frame, 60 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""
    parsed = check.parse_ptxas_log(log, 90)
    assert parsed["_Z4goodPf"] == dict(regs=40, smem=4096, stack=0, spill_stores=0,
                                       spill_loads=0)
    assert parsed["_Z5spillPf"]["spill_stores"] == 60
    usage = check.parse_resource_usage("""arch = sm_80
 Function _Z4goodPf:
  REG:255 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
arch = sm_90
 Function _Z4goodPf:
  REG:40 STACK:0 SHARED:4096 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
""", 90)
    assert usage == {"_Z4goodPf": dict(regs=40, stack=0, shared=4096, local=0)}
    (tmp_path / "build.log").write_text(log)
    (tmp_path / "info.py").write_text("CUDA = True\nCUDA_SKIPPED_BECAUSE = ''\n")
    args = ["--so", str(tmp_path / "none.so"), "--log", str(tmp_path / "build.log"),
            "--build-info", str(tmp_path / "info.py"), "--allow", str(tmp_path / "allow.txt")]
    assert check.main(args) == 1
    (tmp_path / "allow.txt").write_text("# known\nspill\nnothing_matches_this\n")
    assert check.main(args) == 0  # listed (and the stale line only reported)
    (tmp_path / "allow.txt").write_text("")
    (tmp_path / "build.log").write_text(log.split("ptxas info    : Compiling entry function "
                                                  "'_Z5spillPf'")[0])
    assert check.main(args) == 0
    (tmp_path / "info.py").write_text("CUDA = False\nCUDA_SKIPPED_BECAUSE = 'NORMFACE_NO_CUDA=1'\n")
    (tmp_path / "build.log").write_text("")
    assert check.main(args) == 0


def test_stages_pass_fail_time_out_and_respect_the_budget(tmp_path):
    gpu_check = _script("gpu_check")
    py = sys.executable
    passing = gpu_check.Stage("nccl", 30, [[py, "-c", "print('KEY all good')"]], "smoke.log")
    failing = gpu_check.Stage("sync-graph", 30, [[py, "-c", "import sys; sys.exit(3)"],
                                                 [py, "-c", "print('never')"]], "smoke.log")
    # The child and its grandchild are both killed at the cap (process group).
    slow = gpu_check.Stage("memcheck", 2, [[py, "-c", "import subprocess, sys; subprocess.run("
                                            "[sys.executable, '-c', 'import time; "
                                            "time.sleep(60)'])"]], "sanitizer.log")
    late = gpu_check.Stage("racecheck", 30, [[py, "-c", "pass"]], "sanitizer.log")
    with open(tmp_path / "gpu-check.log", "w") as log:
        deadline = time.monotonic() + 300
        start = time.monotonic()
        for stage in (passing, failing, slow):
            gpu_check.run_stage(stage, str(tmp_path), deadline, log)
        assert time.monotonic() - start < 40
        gpu_check.run_stage(late, str(tmp_path), time.monotonic() + 5, log)
    assert passing.status == "passed" and passing.key == ["all good"]
    assert failing.status == "FAILED (exit 3)"
    assert "never" not in (tmp_path / "smoke.log").read_text()
    assert slow.status.startswith("TIMED OUT")
    assert late.status == "skipped (budget)"


def test_lanes_run_side_by_side_wait_for_their_stages_and_leave_time_to_measure(tmp_path):
    gpu_check = _script("gpu_check")
    py = sys.executable

    def stamp(tag, sleep=0.0):
        return [py, "-c", f"import time; time.sleep({sleep}); print('KEY', {tag!r}, "
                          "time.monotonic())"]

    build = gpu_check.Stage("build", 30, [stamp("build", 1.5)], "build.log")
    tests = gpu_check.Stage("cuda-tests", 30, [stamp("cuda")], "cuda.log", after=("build",))
    triton = gpu_check.Stage("triton-tests", 30, [stamp("triton")], "triton.log",
                             lane="triton")
    memcheck = gpu_check.Stage("memcheck", 30, [stamp("memcheck")], "sanitizer.log",
                               lane="sanitizer", after=("build",))
    bench = gpu_check.Stage("bench-rows", 30, [stamp("bench")], "bench.log", lane="measure")
    chosen = [build, tests, triton, memcheck, bench]
    log = gpu_check.DriverLog(str(tmp_path / "gpu-check.log"))
    gpu_check.run_all(chosen, str(tmp_path), gpu_check.Work(str(tmp_path)), 200, log)
    log.close()
    assert all(s.status == "passed" for s in chosen), [(s.name, s.status) for s in chosen]
    when = {s.name: float(s.key[0].split()[-1]) for s in chosen}
    assert when["triton-tests"] < when["build"]                 # not behind the build
    assert when["build"] < min(when["cuda-tests"], when["memcheck"])  # waited for it
    assert when["bench-rows"] > max(when.values()) - 1e-9       # alone, after the checks

    # A stage whose prerequisite failed is skipped; the checks phase ends before the time kept
    # for the measure phase, which still runs.
    broken = gpu_check.Stage("build", 30, [[py, "-c", "import sys; sys.exit(2)"]], "build.log")
    waiting = gpu_check.Stage("cuda-tests", 30, [stamp("x")], "cuda.log", after=("build",))
    slow = gpu_check.Stage("triton-tests", 60, [stamp("slow", 30)], "triton.log", lane="triton")
    measure = gpu_check.Stage("profile", 30, [stamp("profile")], "bench.log", lane="measure")
    log = gpu_check.DriverLog(str(tmp_path / "gpu-check.log"))
    start = time.monotonic()
    budget = gpu_check.RESERVE + 12 + min(gpu_check.MEASURE_SECONDS, 30)
    gpu_check.run_all([broken, waiting, slow, measure], str(tmp_path),
                      gpu_check.Work(str(tmp_path)), budget, log)
    log.close()
    assert broken.status == "FAILED (exit 2)"
    assert waiting.status == "skipped (build did not pass)"
    assert slow.status.startswith("TIMED OUT")
    assert measure.status == "passed"
    assert time.monotonic() - start < 30 + 20


def test_a_carried_build_is_used_only_for_the_same_sources_and_torch(tmp_path):
    gpu_check = _script("gpu_check")
    root = tmp_path / "repo"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "csrc" / "cpu" / "a.cpp").write_text("int a;")
    (root / "setup.py").write_text("setup()")
    digest = gpu_check.source_digest(str(root))
    assert digest == gpu_check.source_digest(str(root))
    carried = tmp_path / "ext"
    carried.mkdir()
    suffix, version = gpu_check._python_tags(sys.executable)
    (carried / f"_C{suffix}").write_bytes(b"\x7fELF")
    (carried / "_build_info.py").write_text(f"CUDA = True\nTORCH = {version!r}\n")
    (carried / "SOURCES").write_text(digest + "\n")
    found = gpu_check.carried_build(sys.executable, str(carried), str(root))
    assert f"_C{suffix}" in found and version in found
    (root / "csrc" / "cpu" / "a.cpp").write_text("int b;")      # csrc changed: rebuild
    assert gpu_check.carried_build(sys.executable, str(carried), str(root)) == ""
    (carried / "SOURCES").write_text(gpu_check.source_digest(str(root)))
    (carried / "_build_info.py").write_text("CUDA = True\nTORCH = '2.0.0'\n")  # other torch
    assert gpu_check.carried_build(sys.executable, str(carried), str(root)) == ""
    assert gpu_check.carried_build(sys.executable, str(tmp_path / "none"), str(root)) == ""


def test_the_triton_lanes_tree_has_sources_and_tests_but_no_builds(tmp_path):
    gpu_check = _script("gpu_check")
    tree = tmp_path / "tree"
    gpu_check.make_snapshot(str(tree), exclude=[os.path.join(ROOT, "gpu-check-out")])
    for path in ("setup.py", "pyproject.toml", "csrc/common.h", "python_tests/conftest.py",
                 "normface_kernels/__init__.py", "scripts/gpu_smoke_ops.py"):
        assert (tree / path).is_file(), path
    for path in (".git", "build", ".venv", "gpu-check-out"):
        assert not (tree / path).exists(), path
    assert not list(tree.glob("normface_kernels/*.so"))


def test_ncu_details_become_one_entry_per_launch():
    gpu_check = _script("gpu_check")
    header = ('"ID","Process ID","Kernel Name","Block Size","Grid Size","Section Name",'
              '"Metric Name","Metric Unit","Metric Value"\n')
    rows = [('0', '_softmax_fwd_kernel', '(256, 1, 1)', '(16, 17, 1)', 'GPU Speed Of Light',
             'Duration', 'us', '812.45'),
            ('0', '_softmax_fwd_kernel', '(256, 1, 1)', '(16, 17, 1)', 'GPU Speed Of Light',
             'Compute (SM) Throughput', '%', '71.2'),
            ('0', '_softmax_fwd_kernel', '(256, 1, 1)', '(16, 17, 1)', 'Occupancy',
             'Achieved Occupancy', '%', '12.4'),
            ('1', 'nvjet_hsh_256x128', '(384, 1, 1)', '(132, 1, 1)', 'GPU Speed Of Light',
             'DRAM Throughput', '%', '35.0')]
    text = header + "".join(",".join(f'"{v}"' for v in (r[0], "7") + r[1:]) + "\n"
                            for r in rows)
    launches = gpu_check.ncu_kernels(text)
    assert launches == [
        dict(kernel="_softmax_fwd_kernel", block="(256, 1, 1)", grid="(16, 17, 1)",
             duration="812.45 us", sm_pct="71.2 %", occupancy_pct="12.4 %"),
        dict(kernel="nvjet_hsh_256x128", block="(384, 1, 1)", grid="(132, 1, 1)",
             dram_pct="35.0 %")]


def test_a_rehearsal_runs_the_whole_check_without_a_gpu(tmp_path):
    run = _run("scripts/gpu_check.py", str(tmp_path), "--rehearse", "--budget", "120",
               "--skip", "peers")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = (tmp_path / "summary.md").read_text()
    for stage in STAGES:
        if stage != "peers":
            assert f"| {stage} |" in summary, stage
    assert "| build | cuda | passed |" in summary and "would run" in summary
    assert set(os.listdir(tmp_path)) <= set(_script("gpu_check").FILES)
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "ext/SOURCES" in names and "ext/_build_info.py" in names
