"""The README's generated tables are what the commands print today."""

import contextlib
import io
import os

from normface_kernels import distributed

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_memory_tables_are_what_python_m_distributed_prints():
    with open(README) as handle:
        readme = handle.read()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distributed.memory.main()                # python -m normface_kernels.distributed
    tables = [block.strip() for block in printed.getvalue().split("\n\n")
              if block.startswith("| classes")]
    assert len(tables) == 2 and all("| sampled |" in table for table in tables)
    for table in tables:
        assert table in readme, f"a README memory table is stale; the command prints:\n{table}"
