"""Every error type jsft raises on purpose, and the one formatter that makes any error one line.

The bottom layer: nothing here imports anything of jsft, so every module may raise these. Errors caused by
the user's input (config, model folder, data) derive from `JsftError`, which the commands print as
`<command>: error: ...` without a traceback.
"""


class JsftError(ValueError):
    """Base of the errors the entry points print as one line without a traceback."""


class ConfigError(JsftError):
    """A configuration problem: an unknown key, a value out of its range or choices."""


class ModelFolderError(JsftError):
    """A model folder that cannot be read, named in one line."""


class UnsupportedModelError(JsftError):
    """A config.json asking for an architecture feature jsft does not implement."""


class ModelOptionError(JsftError):
    """A `model.attention` or `model.remat` choice that is unknown or cannot run this model here."""


class DataError(JsftError):
    """A data problem reported in one line, naming the source (and row)."""


class SetupError(JsftError):
    """The environment failed, not a row (a missing package, an unreadable file): the run stops."""


class TopologyError(JsftError):
    """An unknown TPU slice name or a missing libtpu, named in one line."""


class BadRow(ValueError):
    """A conversation that cannot be trained on; `reason` is a short tag used to count drops.

    Not a JsftError: a bad row is counted and dropped, it never ends a run by itself."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def one_line(error: BaseException, *, with_type: bool = False, first_line: bool = False) -> str:
    """`error`'s message on one line (escaped and real newlines folded), else its type's name.

    `with_type` prefixes the type, for errors of libraries whose message alone is ambiguous; `first_line`
    keeps only the message's first line, for libraries that append pages of context (Orbax, datasets)."""
    message = str(error).strip()
    if first_line:
        message = message.splitlines()[0] if message else ""
    text = " ".join(message.replace("\\n", " ").split())
    if with_type:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text or type(error).__name__
