"""Conversation sources and the mixer that draws from them.

A source is a local .jsonl/.json/.parquet file or folder, or a Hugging Face Hub data set name
(`name` or `name:split`), read with `datasets`. Rows use the `messages` format.
"""

from __future__ import annotations

import glob
import logging
import os

import datasets
import numpy as np

from jsft.errors import JsftError

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(JsftError):
    """A data problem reported in one line, naming the source (and row)."""


def load_source(source: str) -> datasets.Dataset:
    datasets.disable_progress_bars()
    if os.path.exists(source):
        files = (
            sorted(glob.glob(os.path.join(source, "**", "*"), recursive=True))
            if os.path.isdir(source)
            else [source]
        )
        files = [f for f in files if os.path.splitext(f)[1] in _FORMATS]
        if not files:
            raise DataError(f"data source {source}: no .jsonl, .json or .parquet files")
        kinds = {_FORMATS[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise DataError(f"data source {source}: mixes json and parquet files")
        try:
            ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
        except Exception as e:
            raise DataError(f"data source {source}: cannot read it: {str(e).splitlines()[0]}") from None
    else:
        name, _, split = source.partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:
            raise DataError(f"data source {source}: not a local path, and the Hub load failed: {e}") from None
    if "messages" not in ds.column_names:
        raise DataError(
            f"data source {source} has no 'messages' column (columns: {', '.join(ds.column_names)})"
        )
    return ds


def draw(num_rows: int, amount: int | float, seed: int) -> np.ndarray:
    """Row indices for an amount: a float is a fraction (above 1.0 repeats the source), an int a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
        raise DataError(f"mixer amount {amount!r} must be a non-negative int (rows) or float (fraction)")
    wanted = int(round(amount * num_rows)) if isinstance(amount, float) else int(amount)
    rng = np.random.default_rng(seed)
    full, rest = divmod(wanted, num_rows) if num_rows else (0, 0)
    parts = [np.arange(num_rows)] * full + [np.sort(rng.choice(num_rows, rest, replace=False))]
    return np.concatenate(parts).astype(np.int64)


def mix(mixer, seed: int) -> list[tuple[str, datasets.Dataset, np.ndarray]]:
    """Loads each (source, amount) pair and picks its rows; the same seed gives the same rows."""
    out = []
    for i, (source, amount) in enumerate(mixer):
        ds = load_source(source)
        if isinstance(amount, int) and not isinstance(amount, bool) and amount <= 1 < len(ds):
            log.warning(
                "mixer amount %r for %s is a row count; write %.1f for a fraction", amount, source, amount
            )
        indices = draw(len(ds), amount, seed + i)
        log.info("mixer: %s -> %d of %d rows", source, len(indices), len(ds))
        out.append((source, ds, indices))
    return out
