"""Benchmarks, run from the repository root as modules (``python -m benchmarks.train_quality``).

Not installed: benchmarks import ``mfserve``, and nothing in ``mfserve`` imports them
(``tests/e2e/test_import_directions.py``). The serving harness is ``benchmarks.harness``
(``python -m benchmarks.harness``); the other modules are single measurements.
"""
