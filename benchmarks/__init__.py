"""Benchmarks: each prints its figures against its targets and exits non-zero on a miss."""
