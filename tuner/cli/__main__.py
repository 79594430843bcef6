"""`python -m tuner.cli`: the `tuner` command, where the entry point is not installed."""

from tuner.cli import main

main()
