"""PNG: time and extra peak memory against C, one line per backend, one row of panels per op.

One figure per (B, D, dtype) group: STEM.png for the largest group, STEM-B{B}-D{D}-{dtype}.png
for any other group with at least two values of C. Needs matplotlib (skipped, with a note,
without it).
"""

import os

from . import grid

STYLE = {"cpu": ("tab:blue", "o", "-"), "triton": ("tab:purple", "o", "-"),
         "cuda": ("tab:red", "o", "-"), "reference": ("black", "s", "--"),
         "torch_compile": ("tab:gray", "s", ":"), "gemm_floor": ("tab:green", "", "-."),
         "torch_lce": ("tab:orange", "^", "--"), "liger_flce": ("tab:brown", "^", "--"),
         "cce": ("tab:pink", "^", "--"), "pml": ("tab:olive", "v", ":")}


def _groups(report):
    groups = {}
    for row in report.rows:
        if row.median_ms is None and row.peak_mem_mb is None:
            continue
        groups.setdefault((row.B, row.D, row.dtype), []).append(row)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _pass_for(rows):
    passes = {r.pass_name for r in rows}
    return "fwd_bwd" if "fwd_bwd" in passes else next(p for p in grid.PASSES if p in passes)


def _short(c):
    if c >= 1_000_000:
        return f"{c / 1e6:.3g}M"
    if c % 1000 == 0 or c >= 100_000:
        return f"{c / 1000:.0f}k"
    return f"{c:,}"


def write_plots(report, out_dir, stem):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        report.notes.append("PNG plot skipped: matplotlib is not installed")
        return []
    paths = []
    for index, ((B, D, dtype), rows) in enumerate(_groups(report)):
        if index and len({r.C for r in rows}) < 2:
            continue
        ops = [op for op in grid.OPS if any(r.op == op for r in rows)]
        fig, axes = plt.subplots(len(ops), 2, figsize=(11, 2.9 * len(ops)), squeeze=False)
        for axis_row, op in zip(axes, ops):
            op_rows = [r for r in rows if r.op == op]
            pass_name = _pass_for(op_rows)
            op_rows = [r for r in op_rows if r.pass_name == pass_name]
            for ax, field, label in ((axis_row[0], "median_ms", "time (ms)"),
                                     (axis_row[1], "peak_mem_mb", "extra peak memory (MiB)")):
                for backend in dict.fromkeys(r.backend for r in op_rows):
                    points = sorted((r.C, getattr(r, field)) for r in op_rows
                                    if r.backend == backend and getattr(r, field) is not None
                                    and getattr(r, field) > 0)
                    if not points:
                        continue
                    color, marker, line = STYLE.get(backend, (None, "x", "-"))
                    ax.plot([p[0] for p in points], [p[1] for p in points], label=backend,
                            color=color, marker=marker or None, linestyle=line)
                ax.set_xscale("log")
                ax.set_yscale("log")
                cs = sorted({r.C for r in op_rows})
                ax.xaxis.set_major_locator(ticker.FixedLocator(cs))
                ax.xaxis.set_major_formatter(ticker.FixedFormatter([_short(c) for c in cs]))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
                plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
                ax.yaxis.set_minor_formatter(plain)
                ax.tick_params(axis="y", which="minor", labelsize=7)
                ax.set_xlabel("C (classes)")
                ax.set_ylabel(label)
                ax.set_title(f"{op} {pass_name}: {label.split(' (')[0]}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
            if axis_row[0].get_legend_handles_labels()[0]:
                axis_row[0].legend(fontsize=8)
        fig.suptitle(f"normface_kernels, {report.env.device_name}, B={B} D={D} {dtype}, "
                     f"torch {report.env.torch}, {report.env.date}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        name = stem + (".png" if not paths else f"-B{B}-D{D}-{dtype}.png")
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
