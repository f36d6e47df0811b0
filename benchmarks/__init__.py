"""LIFL benchmarks: each prints ratios against a peer measured in the same run.

Run from the repository root, e.g. ``python -m benchmarks.bench_fold [--quick]``;
see docs/benchmarks.md.
"""
