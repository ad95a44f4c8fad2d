"""Command-line entry points of the Python subcommands, one module each (`python -m moetrace NAME`
dispatches to moetrace.analysis / moetrace.speculate, whose main is the one defined here)."""
