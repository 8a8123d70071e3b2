"""The serving harness: closed-loop gRPC load against mfserve, an empty handler and a naive servicer.

Run from the repository root: ``python -m benchmarks.harness --help``. It is not part of the
installed package (benchmarks import mfserve; nothing installed imports benchmarks), so every
server and load client it starts is ``python -m benchmarks.harness.<module>`` with the repository
root on ``PYTHONPATH``.
"""
