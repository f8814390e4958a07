"""Benchmark scripts; run them as ``python benchmarks/<name>.py`` (see benchmarks/common.py)."""
