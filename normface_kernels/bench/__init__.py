"""The benchmark: this package's backends side by side with the peers, CPU and GPU.

    python -m normface_kernels.bench              # full grid (GPU when there is one)
    python -m normface_kernels.bench --quick      # about a minute on a 2-core CPU, with targets
    python -m normface_kernels.bench --targets-only

Modules: grid (ops, cases, grids, targets) · runners (backends and peers) · check (each timed
backend against the reference) · measure (time and extra peak memory) · memworker (CPU memory in
a separate process) · suite (the run) · report (ratios, targets, checks, stdout/CSV/markdown) ·
plot (PNG).
"""

from .suite import Config, run  # noqa: F401

__all__ = ["Config", "run"]
