"""``python -m mfserve`` is the ``mfserve`` console script."""

from mfserve.client._cli import main

raise SystemExit(main())
