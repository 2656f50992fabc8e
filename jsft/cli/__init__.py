"""The one wrapper every jsft command runs under (`@command("jsft.chat")` on its `main(argv)`).

Quiet by default: jsft's own lines at INFO, the libraries' (absl, JAX, Orbax, transformers, datasets, httpx,
lm_eval) only from WARNING up, and the notices they log about what jsft asks of them on purpose not at all.
`--verbose` (or JSFT_VERBOSE=1) shows the libraries' logs. Every end is one line without a traceback: a
JsftError (the user's input) as `<prog>: error: <message>` (`config.load_or_exit` ends a command whose
configuration does not load as `jsft: config error: <message>`), an OSError or a library's error as
`<prog>: failed: <type>: <message>`, whose traceback `--debug` (or JSFT_DEBUG=1) shows.

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

LIBRARY_LOGGERS = ("absl", "jax", "orbax", "transformers", "datasets", "httpx", "lm_eval")
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
    """Drops the notices jsft expects, and keeps a library's error to its message line: its traceback
    (Orbax logs one per failed writer thread) shows with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.exc_info = record.exc_text = None
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


def debug_requested(argv: Sequence[str]) -> bool:
    """`--debug` on the command line, or JSFT_DEBUG set to anything but 0: full tracebacks."""
    return "--debug" in argv or os.environ.get("JSFT_DEBUG", "0") not in ("", "0")


def command(prog: str, *, errors: tuple[type[Exception], ...] = (JsftError,), usage: str = ""):
    """Decorates a command's `main(argv)` (argv without the program name): the wrapped `main(argv=None)`
    reads `sys.argv[1:]` when not given arguments, takes `--verbose` and `--debug` out of them, sets up
    logging, and ends the command in one line: `errors` (the user's input) as `<prog>: error: ...`, a
    fault of the environment or a library (OSError, anything else) as `<prog>: failed: ...` with the
    switch that shows its traceback, a second Ctrl-C as `<prog>: interrupted` (exit status 130). A
    command with a `usage` (the config-driven ones, which have no argparse of their own) prints it for
    `--help` and `-h`."""

    def decorate(main: Callable[[list[str]], None]) -> Callable[[list[str] | None], None]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> None:
            argv = list(sys.argv[1:] if argv is None else argv)
            if usage and ("--help" in argv or "-h" in argv):
                print(usage)
                return
            debug = debug_requested(argv)
            configure_logging(verbose_requested(argv) or debug)
            try:
                main([arg for arg in argv if arg not in ("--verbose", "--debug")])
            except errors as e:
                sys.exit(f"{prog}: error: {one_line(e)}")
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
            except Exception as e:
                if debug:
                    raise
                sys.exit(
                    f"{prog}: failed: {one_line(e, with_type=True)} (--debug or JSFT_DEBUG=1 shows where)"
                )

        return run

    return decorate


CONFIG_USAGE = """usage: {prog} --config=configs/<name>.py [--config.KEY=VALUE ...] [--verbose] [--debug]

{what}
--config.KEY=VALUE overrides any key of the schema (jsft/config.py; README "Running" lists the groups);
--verbose shows the libraries' logs, --debug the traceback of an unexpected failure."""
