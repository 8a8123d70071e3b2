"""Keep gRPC's C-core log lines out of the ``mfserve`` command's output, and only out of its.

A failed TLS handshake (``--tls`` against a plaintext server) makes C-core print raw lines
(``I1202 ... ssl_transport_security.cc:2563] Handshake failed ...``) before the error the command
explains. C-core reads ``GRPC_VERBOSITY`` once, when ``grpc`` is imported, and the console script
(``mfserve.client._cli:main``) imports this package, and with it grpc, before ``_cli``'s own body
runs: so ``__init__`` calls this first. It acts only when this process is the ``mfserve`` command;
a program that imports the SDK keeps its own gRPC logging (the client's docstring says what to
set). ``setdefault``: an operator's ``GRPC_VERBOSITY=INFO`` still shows everything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import PurePath

# What ``python -m`` may name to run the command (``mfserve/__main__.py`` runs ``_cli``).
CLI_MODULES = frozenset({"mfserve", "mfserve.__main__", "mfserve.client._cli"})
# The console script's names: pip's launcher on POSIX, and its .exe / -script.py on Windows.
CLI_SCRIPTS = frozenset({"mfserve", "mfserve.exe", "mfserve-script.py"})
# Interpreter options that take a value (``-X importtime``, ``-W error``): not the script.
_OPTIONS_WITH_VALUE = frozenset("WX")


def is_mfserve_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (``sys.orig_argv``: the interpreter's own command line) runs ``mfserve``."""
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = args.pop(0) if arg == "--" and args else arg
            return PurePath(script).name in CLI_SCRIPTS
        if arg.startswith("--"):
            if arg == "--check-hash-based-pycs" and args:
                args.pop(0)
            continue
        # A cluster of one-letter options (-I, -Bm mfserve, -Xdev): read it as Python does.
        for position, letter in enumerate(arg[1:], start=1):
            rest = arg[position + 1 :]
            if letter == "m":
                module = rest or (args[0] if args else "")
                return module in CLI_MODULES
            if letter == "c":
                return False
            if letter in _OPTIONS_WITH_VALUE:
                if not rest and args:
                    args.pop(0)
                break
    return False


def quiet_for_the_cli() -> None:
    """``GRPC_VERBOSITY=ERROR`` unless set, when this process is the ``mfserve`` command."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    if is_mfserve_command(argv):
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


quiet_for_the_cli()
