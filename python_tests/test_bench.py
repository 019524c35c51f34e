"""Smoke test of the benchmark (python -m normface_kernels.bench): a tiny grid, every writer.

It checks the plumbing -- rows for every backend that can run here, the CSV columns, the markdown
and PNG files, positive times, the targets block, the correctness check -- not any speed.
"""

import csv
import os
import shutil
import subprocess

import pytest
import torch

from normface_kernels.bench import Config, check, grid, run, runners
from normface_kernels.bench.__main__ import config_from_args, parse_args
from normface_kernels.bench.report import CSV_COLUMNS

REQUIRED = ("device", "op", "backend", "B", "D", "C", "dtype", "pass", "median_ms", "peak_mem_mb")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One tiny run shared by the tests: normface and c_triplet, two C values, all passes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny shapes: threads only add scheduling noise
    try:
        report = run(Config(mode="smoke", device="cpu", Bs=(16,), Ds=(8,), Cs=(256, 4096),
                            ops=("normface", "c_triplet"),
                            backends=("reference", "cpu", "cpu_chunked", "gemm_floor", "pml"),
                            cpu_budget_s=0.05, min_reps=2, max_reps=3, progress=False))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("bench")
    return report, report.write(str(out), "smoke"), out


def test_writes_csv_md_png(smoke):
    report, paths, out = smoke
    names = sorted(os.path.basename(p) for p in paths)
    assert "smoke.csv" in names and "smoke.md" in names
    pytest.importorskip("matplotlib")
    assert "smoke.png" in names
    for path in paths:
        assert os.path.getsize(path) > 0
    with open(out / "smoke.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    text = (out / "smoke.md").read_text()
    assert "| op | B | D | C |" in text and report.env.torch in text


def test_csv_columns_and_positive_numbers(smoke):
    _, _, out = smoke
    with open(out / "smoke.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert set(REQUIRED) <= set(CSV_COLUMNS)
    # 2 ops x 2 C x 3 passes, each with at least the reference and the gemm floor
    assert len({(r["op"], r["C"], r["pass"]) for r in rows}) == 12
    for row in rows:
        assert row["device"] == "cpu" and row["dtype"] == "float32"
        assert row["pass"] in ("fwd", "bwd", "fwd_bwd")
        if row["backend"] in ("reference", "gemm_floor"):
            assert row["status"] == "ok", row
            assert float(row["median_ms"]) > 0
            assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
            assert float(row["peak_mem_mb"]) >= 0
            assert float(row["time_vs_gemm_floor"]) > 0
    # the reference's fwd+bwd at C=4096 holds (16, 4096) float32 matrices: clearly above zero
    ref = [r for r in rows if r["backend"] == "reference" and r["C"] == "4096"
           and r["pass"] == "fwd_bwd" and r["op"] == "normface"]
    assert float(ref[0]["peak_mem_mb"]) > 0.1


def test_cpu_backend_rows_when_built(smoke):
    import normface_kernels
    report, _, _ = smoke
    cpu = [r for r in report.rows if r.backend == "cpu"]
    if normface_kernels._cpp_error is not None:
        assert "cpu" in report.skipped and not cpu
        return
    assert cpu and all(r.median_ms > 0 for r in cpu)
    assert all(r.best == "cpu" for r in report.rows)


def test_text_has_header_table_and_skips(smoke):
    report, _, _ = smoke
    text = report.text()
    assert report.env.date in text and "torch" in text
    assert "median ms" in text
    assert "liger_flce" not in report.skipped   # not asked for: not listed


def test_every_ratio_column_is_defined_where_it_appears(smoke):
    """stdout and the markdown both say what x best, x gemm, extra MiB and mem x best are."""
    report, _, out = smoke
    header = report.text().splitlines()
    header = next(line for line in header if line.startswith("op "))
    markdown = (out / "smoke.md").read_text()
    for column in ("x best", "x gemm", "extra MiB", "mem x best", "check"):
        assert column in header
        assert f"  {column}: " in report.text()
        assert f"- *{column}*: " in markdown


def test_default_output_is_ignored_by_git():
    """A run must not dirty the checkout: the default --out is git-ignored, and the committed
    results folder is not (committing a run is a deliberate --out bench/results)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = parse_args([]).out
    top = subprocess.run(["git", "-C", repo, "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True) if shutil.which("git") else None
    if top is None or top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(
            repo):   # e.g. CI's copy of the tree inside the checkout (.ci-oldest/, ignored)
        pytest.skip("not the top of a git checkout")

    def ignored(path):
        return subprocess.run(["git", "-C", repo, "check-ignore", "-q", path]).returncode == 0

    assert ignored(os.path.join(out, "cpu-quick-2026-11-25.csv"))
    assert not ignored("bench/results/cpu-quick-2026-11-25.csv")


def test_targets_block_from_rows():
    """The targets compare rows measured in the same run; PASS/FAIL follows the numbers."""
    from normface_kernels.bench.report import Environment, Report, Row

    env = Environment("d", "cpu", "x", "t", "", "p", 2, "v", "loaded", {})

    def row(case, backend, **fields):
        return Row(date="d", device="cpu", device_name="x", torch="t", triton="", op=case.op,
                   backend=backend, kind="ours", B=case.B, D=case.D, C=case.C, dtype=case.dtype,
                   pass_name="fwd_bwd", status="ok", **fields)

    rows = [row(grid.TARGET_TIME, "cpu", median_ms=5.0),
            row(grid.TARGET_TIME, "reference", median_ms=10.0),
            row(grid.TARGET_MEMORY, "cpu", peak_mem_mb=300.0),
            row(grid.TARGET_MEMORY, "reference", peak_mem_mb=1000.0)]
    targets = Report(env, rows, {}, [], "quick").targets()
    assert [t[3] for t in targets] == ["PASS", "FAIL"]
    assert targets[0][1] == pytest.approx(0.5) and targets[1][1] == pytest.approx(0.3)
    assert "[PASS]" in "\n".join(Report(env, rows, {}, [], "quick").targets_text())


def test_cli_parses_grids():
    config = config_from_args(parse_args(["--quick", "--backends", "reference,cpu",
                                          "--C", "1_000,2000", "--no-memory"]))
    assert config.mode == "quick" and config.Cs == (1000, 2000)
    assert config.backends == ("reference", "cpu") and not config.memory
    assert config_from_args(parse_args(["--targets-only"])).mode == "targets"
    with pytest.raises(SystemExit):
        parse_args(["--backends", "nope"])


# ---------------------------------------------------------------------------------------------
# The correctness check (check.py): every timed row against the reference
# ---------------------------------------------------------------------------------------------

def test_check_agrees_on_every_timed_row(smoke):
    """Ours and the reference are compared on the loss and both gradients, pml on its loss,
    gemm_floor not at all; all agree, and the summary line and the CSV say so."""
    import normface_kernels
    report, _, out = smoke
    timed = [r for r in report.rows if r.median_ms]
    ours = {"reference", "cpu", "cpu_chunked"} if normface_kernels._cpp_error is None else {
        "reference"}
    assert ours | {"gemm_floor"} <= {r.backend for r in timed}
    for row in timed:
        if row.backend == "gemm_floor":
            assert row.check == "n/a"
        elif row.backend == "pml":
            assert row.check.startswith("ok loss ") and row.check.endswith("(loss only)"), row
        else:
            assert row.check.startswith("ok loss ") and " grad " in row.check, row
    checked = sum(r.backend != "gemm_floor" for r in timed)
    assert f"[CHECK] all {checked} checked rows agree with the reference" in report.text()
    with open(out / "smoke.csv", newline="") as handle:
        written = {(r["op"], r["C"], r["pass"], r["backend"]): r["check"]
                   for r in csv.DictReader(handle)}
    assert written == {(r.op, str(r.C), r.pass_name, r.backend): r.check for r in report.rows}
    assert "## Check" in (out / "smoke.md").read_text()


def _raise():
    raise ZeroDivisionError("on purpose")


def _wrong(make, name, how):
    """runners.make_runner with backend `name`'s runner made wrong in one way."""
    def make_runner(backend, op, inputs):
        runner = make(backend, op, inputs)
        if backend != name:
            return runner
        forward, backward = runner.forward, runner.backward
        if how == "loss off by 1%":
            runner.forward = lambda: forward() * 1.01
        elif how == "raises":
            runner.forward = _raise
        else:
            def wrong_backward(out):
                backward(out)
                if how == "grad_w doubled":
                    inputs.weight.grad.mul_(2)
                elif how == "negative classes dropped":
                    keep = torch.zeros_like(inputs.weight.grad[:, :1])
                    keep[inputs.labels] = 1
                    inputs.weight.grad.mul_(keep)
                else:
                    inputs.features.grad = None
            runner.backward = wrong_backward
        return runner
    return make_runner


def _tiny_run(**config):
    return run(Config(mode="smoke", device="cpu", Bs=(16,), Ds=(8,), Cs=(256,), passes=("fwd_bwd",),
                      memory=False, cpu_budget_s=0.02, min_reps=1, max_reps=2, progress=False,
                      **config))


@pytest.mark.parametrize("how, verdict", [
    ("grad_w doubled", "MISMATCH grad_w 1 grad_w_neg 1"),
    # Here the negative classes hold 0.42 of grad_w's norm; at C = 1M only ~0.002 of it.
    ("negative classes dropped", "MISMATCH grad_w 0.42 grad_w_neg 1"),
    ("grad_f missing", "MISMATCH grad_f 1"),
    ("loss off by 1%", "MISMATCH loss 0.01")])
def test_wrong_backend_is_a_mismatch(monkeypatch, how, verdict):
    """A backend whose gradient or loss is wrong is still timed, its row says MISMATCH and what
    is off, and the summary line names it; the others stay ok."""
    wrong = "cpu" if how != "loss off by 1%" else "cpu_chunked"
    monkeypatch.setattr(runners, "make_runner", _wrong(runners.make_runner, wrong, how))
    report = _tiny_run(ops=("normface",), backends=("reference", "cpu", "cpu_chunked"))
    rows = {r.backend: r for r in report.rows}
    if wrong not in rows:
        pytest.skip(report.skipped.get(wrong, "not run"))
    assert rows[wrong].check == verdict and rows[wrong].median_ms > 0
    assert all(r.check.startswith("ok") for r in report.rows if r.backend != wrong)
    assert rows[wrong].best not in ("", wrong)   # a wrong answer is no one's baseline
    assert (f"[CHECK] 1 row disagrees with the reference: {wrong}@normface B=16 D=8 C=256 "
            f"float32 ({verdict[len('MISMATCH '):]})") in report.text().splitlines()


def test_check_error_is_reported_and_the_run_goes_on(monkeypatch):
    monkeypatch.setattr(runners, "make_runner", _wrong(runners.make_runner, "reference", "raises"))
    report = _tiny_run(ops=("c_triplet",), backends=("reference", "gemm_floor"))
    rows = {r.backend: r for r in report.rows}
    assert rows["reference"].check.startswith("error: ZeroDivisionError")
    assert rows["reference"].status.startswith("error: ZeroDivisionError")
    assert rows["gemm_floor"].check == "n/a" and rows["gemm_floor"].median_ms > 0
    lines = report.text().splitlines()
    assert any(line.startswith("[CHECK] 1 row could not be checked: reference@c_triplet")
               for line in lines)
    assert not any("agree" in line for line in lines if line.startswith("[CHECK]"))


def test_no_check_leaves_the_column_empty():
    report = _tiny_run(ops=("normface",), backends=("reference",), check=False)
    assert [r.check for r in report.rows] == [""]
    assert "[CHECK]" not in report.text()
    assert not config_from_args(parse_args(["--quick", "--no-check"])).check


@pytest.mark.parametrize("op", ["arcface", "c_triplet"])
def test_expected_in_row_chunks_is_the_whole(op):
    """The reference in row chunks (how a GPU case with a huge B x C fits) gives the result of
    one piece; float64 inputs stay float64 and meet the float64 tolerance."""
    case = grid.Case(op, 9, 6, 40)
    inputs = runners.Inputs.make(case, "cpu")
    inputs = runners.Inputs(inputs.features.detach().double().requires_grad_(),
                            inputs.weight.detach().double().requires_grad_(), inputs.labels)
    whole = check.expected(op, inputs)
    rows = check.rows_per_chunk(case.B, case.C, 4 * check.REFERENCE_BYTES_PER_ENTRY * case.C)
    assert rows == 4
    parts = check.expected(op, inputs, budget_bytes=4 * check.REFERENCE_BYTES_PER_ENTRY * case.C)
    assert whole.grad_weight.dtype == torch.float64 and whole.tolerance.grad == 1e-9
    assert parts.loss == pytest.approx(whole.loss, rel=1e-12)
    torch.testing.assert_close(parts.grad_features, whole.grad_features, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts.grad_weight, whole.grad_weight, rtol=1e-12, atol=1e-15)
    runner = runners.make_runner("reference", op, inputs)
    assert check.check_runner(runner, inputs, parts).startswith("ok loss ")


def test_verdict_and_tolerances():
    tol = check.TOLERANCES[torch.float32]
    assert check.verdict({"loss": 1e-5, "grad_f": 3e-3, "grad_w": 1e-3}, tol) == (
        "ok loss 1e-05 grad 3e-03")
    assert check.verdict({"loss": 0.0}, tol) == "ok loss 0 (loss only)"
    assert check.verdict({"loss": float("nan")}, tol) == "MISMATCH loss nan"
    assert check.verdict({"loss": 0.0, "grad_f": 0.5, "grad_w": 1.0}, tol) == (
        "MISMATCH grad_f 0.5 grad_w 1")
    # The tolerance follows the precision of the products: 16-bit is looser, float64 tighter.
    assert (check.tolerance(torch.float64, "cpu").grad < tol.grad
            < check.tolerance(torch.bfloat16, "cuda").grad)
    assert check.tolerance(torch.float32, "cpu") == tol


def test_partial_results_are_written_after_each_case(tmp_path):
    """A run stopped early keeps what it measured: after each case the caller gets the report so
    far (the command line writes its CSV and markdown, the plots at the end)."""
    seen = []

    def on_case(report):
        seen.append(sorted({r.C for r in report.rows}))
        report.write(str(tmp_path), "partial", plots=False)
    run(Config(mode="smoke", device="cpu", Bs=(16,), Ds=(8,), Cs=(256, 128), passes=("fwd",),
               ops=("normface",), backends=("reference",), memory=False, cpu_budget_s=0.02,
               min_reps=1, max_reps=2, progress=False), on_case=on_case)
    assert seen == [[256], [128, 256]]      # in the order given
    assert sorted(os.listdir(tmp_path)) == ["partial.csv", "partial.md"]
