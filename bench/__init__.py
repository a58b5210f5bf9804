"""Benchmarks: absl binaries run from the repository root as `python -m bench.NAME`."""
