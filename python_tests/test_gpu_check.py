"""The GPU check's plumbing without a GPU (scripts/gpu_check.py and its smoke scripts): the dry
run names every stage's commands and files that exist, a machine without a GPU is refused at
once, the results fit what the device tool brings back, and the smoke scripts run on CPU."""

import csv
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("build", "cuda-resources", "sync-graph", "nccl", "cuda-tests", "triton-tests", "peers",
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
                   "--C 1048576,131072,16384", "gemm_floor", "torch_compile",
                   "liger_flce,cce", "scripts/gpu_profile.py", "--clock-control none",
                   "NORMFACE_NO_CUDA=1"):
        assert needle in run.stdout, needle
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_dry_run_selects_stages():
    run = _run("scripts/gpu_check.py", "--dry-run", "--only", "build,nccl")
    assert run.returncode == 0, run.stderr
    assert "[build]" in run.stdout and "[nccl]" in run.stdout
    assert "[cuda-tests]" not in run.stdout
    # --only brings along what a stage needs: the build (carried or not) and the peers' wheels.
    bench = _run("scripts/gpu_check.py", "--dry-run", "--only", "bench-rows")
    assert bench.returncode == 0, bench.stderr
    assert [line.split("]")[0][1:] for line in bench.stdout.splitlines()
            if line.startswith("[")] == ["build", "peers", "bench-rows"]
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
    package = tmp_path / "package"
    package.mkdir()
    (package / "_build_info.py").write_text("CUDA = True\n")
    gpu_check.pack_results(str(tmp_path), str(tmp_path / "bench"), str(package))
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["bench/rows.csv", "ext/SOURCES", "ext/_build_info.py"]
        sources = tar.extractfile("ext/SOURCES").read().decode().strip()
    assert sources == gpu_check.source_digest()
    for stage in stages:
        stage.status, stage.seconds, stage.key = "passed", 1.0, ["k"]
    stages[4].status = "TIMED OUT (150 s)"
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
    missing = gpu_check.Stage("ncu", 30, [["/nonexistent/ncu", "--version"]], "bench.log")
    picky = gpu_check.Stage("profile", 30, [[py, "-c", "pass"]], "bench.log", min_seconds=60)
    with open(tmp_path / "gpu-check.log", "w") as log:
        deadline = time.monotonic() + 300
        start = time.monotonic()
        for stage in (passing, failing, slow):
            gpu_check.run_stage(stage, str(tmp_path), deadline, log)
        assert time.monotonic() - start < 40
        gpu_check.run_stage(late, str(tmp_path), time.monotonic() + 5, log)
        gpu_check.run_stage(missing, str(tmp_path), deadline, log)
        gpu_check.run_stage(picky, str(tmp_path), time.monotonic() + 60, log)
    assert passing.status == "passed" and passing.key == ["all good"]
    assert failing.status == "FAILED (exit 3)"
    assert "never" not in (tmp_path / "smoke.log").read_text()
    assert slow.status.startswith("TIMED OUT")
    assert late.status.startswith("skipped (budget")
    assert missing.status == "FAILED (exit 127)"        # a missing tool fails its stage only
    assert "cannot run /nonexistent/ncu" in (tmp_path / "bench.log").read_text()
    assert picky.status.startswith("skipped (budget")   # under a minute left: not started


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
    body = "".join(",".join(f'"{v}"' for v in (r[0], "7") + r[1:]) + "\n" for r in rows)
    text = "==PROF== Disconnected\n" + header + body   # ncu's own lines may come first
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


def test_gpu_profile_runs_on_cpu(tmp_path):
    B, C, D = 32, 2048, 32
    run = _run("scripts/gpu_profile.py", "--device", "cpu", "--B", str(B), "--C", str(C),
               "--D", str(D), "--backends", "cpu,reference", "--reps", "2", "--out",
               str(tmp_path), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    keys = re.findall(r"^KEY (.*)$", run.stdout, re.M)
    assert keys[0].startswith("ceiling: float32 matmul 1024^3 ") and "GB/s" in keys[0]
    assert [k.split(":")[0] for k in keys[1:]] == ["cpu", "cpu top", "reference",
                                                   "reference top"], keys
    assert "x the 3 bare GEMMs" in keys[3] and "3.0 GEMM-eq at" in keys[3]
    with open(tmp_path / "profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["backend"] for r in rows} == {"ceiling", "cpu", "reference"}
    assert os.listdir(tmp_path) == ["profile.csv"]
    # The reference's GEMMs (f W^T, G W, G^T f, and the B-length target dots) from the shapes.
    gemm = next(r for r in rows if r["backend"] == "reference" and r["kernel"] == "library GEMM")
    assert abs(float(gemm["model_flops"]) / (6 * B * C * D) - 1) < 0.01
    assert gemm["limiter"] in ("compute", "latency") and float(gemm["tflops"]) > 0
    ncu = _run("scripts/gpu_profile.py", "--device", "cpu", "--ncu", "--C", "256",
               "--backends", "reference", timeout=120)
    assert ncu.returncode == 0 and "regex:'nvjet|gemm|" in ncu.stdout, ncu.stdout + ncu.stderr
    assert "KEY" not in ncu.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_profile_without_a_gpu_stops_at_once():
    run = _run("scripts/gpu_profile.py")
    assert run.returncode == 2 and "no CUDA GPU" in run.stdout, run.stdout + run.stderr


def test_gpu_profile_models_and_profiler_events():
    prof = _script("gpu_profile")
    # Kernel names as the profiler reports them on an H200 (demangled), grouped by the table.
    for name, group in [
            ("_softmax_fwd_kernel", "_softmax_fwd_kernel"),
            ("_row_norm_kernel", "_row_norm_kernel"),
            ("void normface::chunked::cuda::(anonymous namespace)::row_norms_kernel<__nv_bfloat16"
             ", float>(__nv_bfloat16 const*, long, long, float, float*, float*)",
             "row_norms_kernel"),
            ("void normface::chunked::cuda::(anonymous namespace)::softmax_backward_kernel<"
             "__nv_bfloat16>(normface::chunked::cuda::RowArgs, ...)", "softmax_backward_kernel"),
            ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "library GEMM"),
            ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1",
             "library GEMM"),
            ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn"
             "_align8>(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::"
             "Params)", "library GEMM"),
            ("void cublasLt::splitKreduce_kernel<32, 16, int, float, float>(...)",
             "library GEMM"),
            ("aten::mm", "library GEMM"),
            ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float"
             ">, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, ...)",
             "vectorized_elementwise_kernel"),
            ("Memcpy DtoD (Device -> Device)", "Memcpy DtoD (Device -> Device)"),
            ("aten::mul", "aten::mul")]:
        assert prof.classify(name) == group, name
    assert prof.limiter(None, None, 5.0) == "latency" == prof.limiter(30.0, 10.0, 19.0)
    assert prof.limiter(90.0, 10.0, 12.0) == "compute"  # short, but near a ceiling
    assert prof.limiter(80.0, 10.0, 500.0) == "compute"
    assert prof.limiter(5.0, 60.0, 500.0) == "memory" == prof.limiter(None, 60.0, 500.0)
    assert prof.limiter(None, None, 500.0) == ""

    # docs/kernels.md at B = 1024, C = 2^20, D = 512, bf16, 17 class splits (H200).
    B, C, D = 1024, 2 ** 20, 512
    p = prof.problem(B, C, D, torch.bfloat16, torch.device("cuda"), splits=17)
    assert (p.e, p.ep) == (2, 2)
    assert prof.problem(B, C, D, torch.bfloat16, torch.device("cpu")).ep == 4
    items = [("_softmax_fwd_kernel", 4000.0), ("_grad_weight_kernel", 4000.0),
             ("_row_norm_kernel", 300.0), ("_row_norm_kernel", 5.0), ("nvjet_x", 10.0)]
    ceiling = SimpleNamespace(tflops=800.0, gbs=4000.0)
    rows = {r["kernel"]: r for r in prof.kernel_rows("triton", items, p, [], ceiling)}
    fwd, gw, norm = rows["_softmax_fwd_kernel"], rows["_grad_weight_kernel"], rows[
        "_row_norm_kernel"]
    assert fwd["model_flops"] == 4 * B * C * D
    assert fwd["model_bytes"] == (C + B) * D * 2 + 17 * B * D * 4  # W, f; U partials 35 MB
    assert fwd["tflops"] == pytest.approx(4 * B * C * D / 4e-3 / 1e12)
    assert fwd["pct_matmul_ceiling"] == pytest.approx(fwd["tflops"] / 8)
    assert fwd["limiter"] == "compute" and fwd["share"] == pytest.approx(4000 / 8315)
    assert gw["model_flops"] == pytest.approx(2.03 * 2 * B * C * D)
    assert gw["model_bytes"] == 2 * C * D * 2
    assert (norm["calls"], norm["model_bytes"], norm["limiter"]) == (2, (B + C) * D * 2, "memory")
    assert norm["gbs"] == pytest.approx((B + C) * D * 2 / 305e-6 / 1e9)
    assert rows["library GEMM"]["model_flops"] is None  # no aten::mm events given
    assert rows["library GEMM"]["limiter"] == "latency"  # 10 us, no model
    unknown = prof.problem(B, C, D, torch.bfloat16, torch.device("cuda"))
    assert prof.MODELS["_softmax_fwd_kernel"][1](unknown) == (C + B) * D * 2
    assert not prof.MODELS["_softmax_merge_kernel"][1](unknown)
    assert prof.MODELS["softmax_backward_kernel"][1](p) == B * C * 6
    assert prof.MODELS["finish_rows_kernel"][1](p) == (C + B) * D * 8
    assert prof.STEP_MODELS["cuda"][1](p) == C * D * 22  # C D (7e + 8)

    # GEMM flops from recorded shapes (mm.out, addmm_, bmm), and from a real CPU profile.
    assert prof.mm_flops("aten::mm", [[1024, 512], [512, 6400], [], [1024, 6400]]) == \
        2 * 1024 * 512 * 6400
    assert prof.mm_flops("aten::addmm_", [[1024, 512], [1024, 6400], [6400, 512], [], []]) == \
        2 * 1024 * 6400 * 512
    assert prof.mm_flops("aten::bmm", [[8, 1, 64], [8, 64, 1]]) == 2 * 8 * 64
    assert prof.mm_flops("aten::mm", [[3, 4]]) == prof.mm_flops("aten::mm", [[3, 4], [5, 6]]) == 0
    a, b = torch.randn(32, 48), torch.randn(48, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as recorded:
        torch.matmul(a, b)
        torch.nn.functional.linear(a, b.t(), torch.zeros(16))
    events = list(recorded.events())
    assert prof.gemm_flops(events) == 2 * 2 * 32 * 48 * 16
    assert {name for name, _ in prof.profile_items(events, on_gpu=False)} >= {"aten::matmul"}
    assert prof.profile_items(events, on_gpu=True) == []

    # Device events as torch's profiler builds them (any torch >= 2.11), and older attributes.
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent
    kernel = FunctionEvent(id=1, name="_grad_weight_kernel", thread=0, start_us=10, end_us=260,
                           use_device="cuda", device_type=DeviceType.CUDA)
    no_device = FunctionEvent(id=2, name="nvjet_x", thread=0, start_us=0, end_us=7,
                              device_type=DeviceType.CUDA)
    host = FunctionEvent(id=3, name="aten::mm", thread=0, start_us=0, end_us=300)
    assert prof.profile_items([kernel, no_device, host], on_gpu=True) == [
        ("_grad_weight_kernel", 250.0), ("nvjet_x", 7.0)]
    assert prof.event_us(SimpleNamespace(cuda_time_total=42)) == 42.0


def test_gpu_profile_report_of_an_h200_like_step(capsys):
    """The GPU report from a made-up profile (kernel names and counts as on an H200)."""
    from torch.autograd.profiler_util import FunctionEvent
    prof = _script("gpu_profile")
    prof.triton_splits = lambda *args: 17
    B, C, D, n = 1024, 2 ** 20, 512, 8192  # 128 chunks of 8192 classes
    args = SimpleNamespace(B=B, C=C, D=D, dtype=torch.bfloat16, reps=5)
    cuda, ceiling = torch.device("cuda"), SimpleNamespace(tflops=800.0, gbs=4000.0)
    elementwise = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>"
    triton = [("_row_norm_kernel", 300.0), ("_row_norm_kernel", 3.0), ("_target_cos_kernel", 4.0),
              ("_softmax_fwd_kernel", 5000.0), ("_softmax_merge_kernel", 30.0),
              ("_row_grad_kernel", 8.0), ("_grad_weight_kernel", 5500.0)]
    triton += [(elementwise, 2.0)] * 50
    rows = prof.report(args, "triton", cuda, ceiling, [], triton, 12.0, 8.0)
    out = capsys.readouterr().out
    assert re.findall(r"^KEY (.*)$", out, re.M) == [
        "triton: step 12.000 ms = 1.50x the 3 bare GEMMs (8.000 ms, 412 TFLOP/s); 4.03 GEMM-eq at "
        "369 TFLOP/s (46.2% of matmul)",
        "triton top: _grad_weight_kernel 50.3% 406 TFLOP/s (50.7%) compute; _softmax_fwd_kernel "
        "45.7% 440 TFLOP/s (55.0%) compute; _row_norm_kernel 2.8% 3547 GB/s (88.7%) memory"]
    assert [r["kernel"] for r in rows][-2:] == ["(step)", "(3 bare GEMMs)"]
    assert "vectorized_elementwise_kernel" in out and "model 4.37 GB per step" in out

    chunked, mm = [], []
    for j in range(C // n):
        chunked += [("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", 12.0)] * 4 + [
            ("void normface::chunked::cuda::(anonymous namespace)::softmax_forward_kernel<"
             "__nv_bfloat16>(...)", 8.0),
            ("void normface::chunked::cuda::(anonymous namespace)::softmax_backward_kernel<"
             "__nv_bfloat16>(...)", 10.0),
            ("void normface::chunked::cuda::(anonymous namespace)::finish_rows_kernel<"
             "__nv_bfloat16, float, float>(...)", 30.0), (elementwise, 2.0)]
        mm += [FunctionEvent(id=j, name="aten::mm", thread=0, start_us=j, end_us=j + 1,
                             input_shapes=shapes)
               for shapes in ([[B, D], [D, n], [], [B, n]], [[B, D], [D, n], [], [B, n]],
                              [[B, n], [n, D], [], [B, D]], [[n, B], [B, D], [], [n, D]])]
    nested = FunctionEvent(id=-1, name="aten::mm", thread=0, start_us=0, end_us=1,
                           input_shapes=[[B, D], [D, n]])
    nested.set_cpu_parent(mm[0])
    rows = prof.report(args, "cuda", cuda, ceiling, mm + [nested], chunked, 20.0, 8.0)
    out = capsys.readouterr().out
    gemm = next(r for r in rows if r["kernel"] == "library GEMM")
    assert gemm["calls"] == 512 and gemm["model_flops"] == 4 * 2 * B * C * D
    assert "library GEMM flops (recorded shapes): 4.00 GEMM-eq" in out and "L2" in out
    keys = re.findall(r"^KEY (.*)$", out, re.M)
    assert keys[0].startswith("cuda: step 20.000 ms = 2.50x the 3 bare GEMMs") and \
        "; 4.0 GEMM-eq at 220 TFLOP/s" in keys[0]
    # 12 us GEMMs near the matmul ceiling are compute-bound, not "latency"; the epilogues'
    # modelled bytes may be L2 traffic (> 100% of the copy).
    assert keys[1] == ("cuda top: library GEMM 49.0% 716 TFLOP/s (89.5%) compute; "
                       "finish_rows_kernel 30.6% 1120 GB/s (28.0%) memory; "
                       "softmax_backward_kernel 10.2% 5033 GB/s (126%) memory")
