"""Errors caused by the user's input (config, model folder, data), reported as one line."""


class JsftError(ValueError):
    """Base of the errors the entry points print as `jsft: error: ...` without a traceback."""
