"""``python -m benchmarks.harness``: the serving benchmark (see ``benchmarks.harness.cli``)."""

from benchmarks.harness.cli import main

raise SystemExit(main())
