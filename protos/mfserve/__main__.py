"""``python -m mfserve`` is the ``mfserve`` console script."""

from mfserve._command import main

raise SystemExit(main())
