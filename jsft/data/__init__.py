"""Instruction data: sources and mixing, chat encoding with assistant masks, the cache, the Grain pipeline.

`prepare(cfg.data, tokenizer, seed=..., mixer=...)` gives the encoded rows (cached on disk) of mixer
entries `(source, amount)` or `(source, amount, format)`;
`batches(encoded.examples, ...)` gives packed, sharded, resumable training batches.
"""

from jsft.data.cache import EncodedData
from jsft.data.masking import ChatEncoder, encode_messages, encode_messages_incremental
from jsft.data.pipeline import batches, count_batches, example_batch_rows, example_batches, packing_report
from jsft.data.preprocess import encode_mixture, prepare
from jsft.data.templates import BUILTIN_TEMPLATES, resolve_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatEncoder",
    "EncodedData",
    "batches",
    "count_batches",
    "example_batch_rows",
    "example_batches",
    "encode_messages",
    "encode_messages_incremental",
    "encode_mixture",
    "packing_report",
    "prepare",
    "resolve_template",
]
