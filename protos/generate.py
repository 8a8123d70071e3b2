"""Regenerate the Python code for the proto contract: ``python protos/generate.py``.

The generated files are committed (so the thin client needs no grpcio-tools) and
``tests/contract/test_generated_code.py`` fails when they drift from what this script produces now.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("mfserve/v1/recommender.proto",)


def generate(out_dir: Path) -> None:
    """Run grpcio-tools' bundled protoc, writing ``mfserve/v1/*_pb2*.py[i]`` under ``out_dir``."""
    from grpc_tools import protoc  # dev-only dependency, imported late

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
