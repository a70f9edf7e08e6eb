"""`python -m pipeline ...` (what torchrun's `-m pipeline` and `--nproc` start per rank)."""

from pipeline.cli import main

main()
