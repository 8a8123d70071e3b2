"""Benchmark scripts, run from the repository root as modules (``python -m benchmarks.train_quality``).

The serving harness itself is installed as ``mfserve bench`` (``mfserve.server.bench``), so a
deployment can be measured where it runs.
"""
