"""python -m normface_kernels.distributed: the README's memory tables."""

from .memory import main

main()
