"""Serving benchmarks: a closed-loop load generator and the baselines it compares mfserve against.

Run from the repository root as modules (``python -m benchmarks.harness``) so the servers and client
processes it starts import the same code.
"""
