"""Instruction data: sources and mixing, chat encoding with assistant masks, the Grain pipeline."""

from jsft.data.chat import BUILTIN_TEMPLATES, BadRow, encode_messages, resolve_template
from jsft.data.pipeline import batches, count_batches, encode_mixture
from jsft.data.sources import DataError

__all__ = [
    "BUILTIN_TEMPLATES",
    "BadRow",
    "DataError",
    "batches",
    "count_batches",
    "encode_messages",
    "encode_mixture",
    "resolve_template",
]
