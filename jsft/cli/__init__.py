"""The one wrapper every jsft command runs under (`@command("jsft.chat")` on its `main(argv)`).

Quiet by default: jsft's own lines at INFO, the libraries' (absl, JAX, Orbax, transformers, datasets, httpx)
only from WARNING up, and the notices they log about what jsft asks of them on purpose not at all.
`--verbose` (or JSFT_VERBOSE=1) shows the libraries' logs. A JsftError ends the command as one line,
`<prog>: error: <message>`, without a traceback (`config.load_or_exit` ends a command whose configuration
does not load as `jsft: config error: <message>`).

Importing this package (as `python -m jsft.cli.<command>` does first) also silences transformers'
import-time advisory "PyTorch was not found", which concerns models jsft never loads through PyTorch.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

from jsft.errors import JsftError, one_line

LIBRARY_LOGGERS = ("absl", "jax", "orbax", "transformers", "datasets", "httpx")
# Warnings a library logs about a choice jsft makes on purpose: opening a run's checkpoints read-only.
EXPECTED_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def verbose_requested(argv: Sequence[str]) -> bool:
    """`--verbose` on the command line, or JSFT_VERBOSE set to anything but 0."""
    return "--verbose" in argv or os.environ.get("JSFT_VERBOSE", "0") not in ("", "0")


if not verbose_requested(sys.argv):  # before any command module imports transformers
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class _CurrentStderr(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each line (a redirect, a test's capture), not as it was at start."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _DropExpectedNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in EXPECTED_NOTICES)


_DROP_EXPECTED = _DropExpectedNotices()


def configure_logging(verbose: bool) -> None:
    """One handler on the root logger (replacing a plain one a library's `logging.warning` may have
    installed); libraries at WARNING with the expected notices dropped, or everything at INFO."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.setLevel(logging.INFO if verbose else logging.WARNING)
        library.removeFilter(_DROP_EXPECTED)
        if not verbose:
            library.addFilter(_DROP_EXPECTED)


def command(prog: str, *, errors: tuple[type[Exception], ...] = (JsftError,)):
    """Decorates a command's `main(argv)` (argv without the program name): the wrapped `main(argv=None)`
    reads `sys.argv[1:]` when not given arguments, takes `--verbose` out of them, sets up logging, and
    turns `errors` into `sys.exit("<prog>: error: <one line>")` (exit status 1)."""

    def decorate(main: Callable[[list[str]], None]) -> Callable[[list[str] | None], None]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> None:
            argv = list(sys.argv[1:] if argv is None else argv)
            configure_logging(verbose_requested(argv))
            try:
                main([arg for arg in argv if arg != "--verbose"])
            except errors as e:
                sys.exit(f"{prog}: error: {one_line(e)}")

        return run

    return decorate
