"""`python -m pipeline.cli ...`, the same as `pipeline ...` and `python -m pipeline ...`."""

from pipeline.cli import main

main()
