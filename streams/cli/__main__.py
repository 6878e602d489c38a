"""`python -m streams.cli` runs the `prefstream` command (the supervisor and job launcher start children this way)."""

from streams.cli import main

main()
