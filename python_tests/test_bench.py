"""Smoke test of the benchmark (python -m normface_kernels.bench): a tiny grid, every writer.

It checks the plumbing -- rows for every backend that can run here, the CSV columns, the markdown
and PNG files, positive times, the targets block -- not any speed.
"""

import csv
import os
import shutil
import subprocess

import pytest
import torch

from normface_kernels.bench import Config, run
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
                            backends=("reference", "cpu", "gemm_floor"),
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
    for column in ("x best", "x gemm", "extra MiB", "mem x best"):
        assert column in header
        assert f"  {column}: " in report.text()
        assert f"- *{column}*: " in markdown


def test_default_output_is_ignored_by_git():
    """A run must not dirty the checkout: the default --out is git-ignored, and the committed
    results folder is not (committing a run is a deliberate --out bench/results)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = parse_args([]).out
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", repo, "rev-parse", "--git-dir"], capture_output=True).returncode:
        pytest.skip("not a git checkout")

    def ignored(path):
        return subprocess.run(["git", "-C", repo, "check-ignore", "-q", path]).returncode == 0

    assert ignored(os.path.join(out, "cpu-quick-2026-11-25.csv"))
    assert not ignored("bench/results/cpu-quick-2026-11-25.csv")


def test_targets_block_from_rows():
    """The targets compare rows measured in the same run; PASS/FAIL follows the numbers."""
    from normface_kernels.bench import grid
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
