"""Shared fixtures. The server fixtures live in ``server_harness`` (importable by any test)."""

from server_harness import model_dir, server_address, synthetic_model

__all__ = ["model_dir", "server_address", "synthetic_model"]
