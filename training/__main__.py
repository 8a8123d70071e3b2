"""``python -m mfserve.training train ...``: the training commands, as torchrun runs them
(``torchrun --nproc-per-node 2 -m mfserve.training train``)."""

from mfserve.training.cli import main

raise SystemExit(main())
