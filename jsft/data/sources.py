"""Conversation sources and the mixer that draws from them.

A source is a local .jsonl/.json/.parquet file or folder, or a Hugging Face Hub data set name
(`name`, `name:split` or `name:config:split`), read with `datasets`. Rows use the `messages` format
(a list of {role, content}, with an optional `tools` column); ShareGPT (`conversations` of
{from, value}) and Alpaca (`instruction`, `input`, `output`) rows are converted on the fly.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

import datasets
import numpy as np

from jsft.errors import JsftError

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# Integer amounts at most this large and below this fraction of their source look like a mistyped fraction.
_AMBIGUOUS_COUNT, _AMBIGUOUS_SHARE = 10, 0.01


class DataError(JsftError):
    """A data problem reported in one line, naming the source (and row)."""


def local_files(source: str) -> list[str]:
    """The data files of a local source (a file, or every data file under a folder), sorted."""
    files = (
        sorted(glob.glob(os.path.join(source, "**", "*"), recursive=True))
        if os.path.isdir(source)
        else [source]
    )
    return [f for f in files if os.path.splitext(f)[1] in _FORMATS]


def fingerprint(source: str) -> str:
    """Identifies a source's content for the cache key: local files by path, size and mtime."""
    if not os.path.exists(source):
        return f"hub:{source}"
    stats = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in local_files(source)]
    return "local:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def load_source(source: str) -> datasets.Dataset:
    datasets.disable_progress_bars()
    if os.path.exists(source):
        files = local_files(source)
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
        parts = source.split(":")
        if len(parts) > 3:
            raise DataError(f"data source {source}: expected name, name:split or name:config:split")
        name, config, split = (
            parts[0],
            parts[1] if len(parts) == 3 else None,
            parts[-1] if len(parts) > 1 else "",
        )
        try:
            ds = datasets.load_dataset(name, config, split=split or "train")
        except Exception as e:
            raise DataError(f"data source {source}: not a local path, and the Hub load failed: {e}") from None
    columns = set(ds.column_names)
    if not ({"messages"} <= columns or {"conversations"} <= columns or {"instruction", "output"} <= columns):
        raise DataError(
            f"data source {source} has no 'messages' column (columns: {', '.join(ds.column_names)})"
        )
    return ds


def row_messages(row: dict) -> object:
    """The row's conversation in the messages format; malformed rows are left for the encoder to reject."""
    if "messages" in row:
        return row["messages"]
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            return turns
        return [
            {"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
            if isinstance(t, dict)
            else t
            for t in turns
        ]
    prompt = "\n\n".join(p for p in (row.get("instruction"), row.get("input")) if isinstance(p, str) and p)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get("output")}]


def draw(num_rows: int, amount: int | float, seed: int) -> np.ndarray:
    """Row indices for an amount: a float is a fraction (above 1.0 repeats the source), an int a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
        raise DataError(f"mixer amount {amount!r} must be a non-negative int (rows) or float (fraction)")
    wanted = int(round(amount * num_rows)) if isinstance(amount, float) else int(amount)
    rng = np.random.default_rng(seed)
    full, rest = divmod(wanted, num_rows) if num_rows else (0, 0)
    parts = [np.arange(num_rows)] * full + [np.sort(rng.choice(num_rows, rest, replace=False))]
    return np.concatenate(parts).astype(np.int64)


def is_ambiguous(amount: int | float, num_rows: int) -> bool:
    """An integer amount tiny against its source: probably 1 (or 2) meant as 1.0 (or 2.0)."""
    is_count = isinstance(amount, int) and not isinstance(amount, bool)
    return is_count and amount <= _AMBIGUOUS_COUNT and amount < _AMBIGUOUS_SHARE * num_rows


def mix(mixer, seed: int) -> list[tuple[str, datasets.Dataset, np.ndarray]]:
    """Loads each (source, amount) pair and picks its rows; the same seed gives the same rows."""
    out = []
    for i, (source, amount) in enumerate(mixer):
        ds = load_source(source)
        if is_ambiguous(amount, len(ds)):
            log.warning(
                "mixer amount %r for %s (%d rows) is a row count; write %.1f for a fraction",
                amount,
                source,
                len(ds),
                amount,
            )
        indices = draw(len(ds), amount, seed + i)
        log.info("mixer: %s -> %d of %d rows (amount %r)", source, len(indices), len(ds), amount)
        out.append((source, ds, indices))
    return out
