"""Benchmarks, run on demand (`make bench`); figures go to BENCHMARKS.md."""
