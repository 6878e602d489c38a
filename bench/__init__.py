"""Benchmarks behind `make bench`: each measures ours against the naive or anchor way in one run."""
