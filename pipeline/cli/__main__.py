"""``python -m pipeline.cli``: the same command line (how the tests start workers)."""

from pipeline.cli import main

main()
