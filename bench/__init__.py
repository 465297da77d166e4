"""Benchmarks: each module runs as ``python -m bench.NAME``, prints a table and writes bench/results/."""
