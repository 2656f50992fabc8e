"""From (source, amount) pairs to encoded rows on disk, once per data set, tokenizer and template.

`prepare` is the entry point: it hashes everything the encoded rows depend on into a cache key, and
either maps the cached arrays (a second run, or another host sharing the cache folder) or encodes
the mixture in parallel worker processes and writes the cache atomically. Workers are spawned, not
forked, so a parent that has started JAX threads cannot deadlock them.

Rows are stored flat: `token_ids` (int32) and `trained` (bool) of every kept row back to back, and
`row_starts` (int64, rows + 1 entries). `EncodedData` reads them lazily as shifted examples.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import tqdm

from jsft.data import sources
from jsft.data.chat import BadRow, ChatEncoder, resolve_template

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored format or the encoding changes
CHUNK_ROWS = 256  # rows per task sent to a worker process
MIN_ROWS_PER_PROCESS = 1000  # below this, spawning workers costs more than it saves
_ARRAYS = ("token_ids", "trained", "row_starts")


@dataclasses.dataclass
class EncodedData(Sequence):
    """Encoded rows, indexed as shifted examples: `input_ids`, `target_ids`, `loss_mask` (int32)."""

    token_ids: np.ndarray
    trained: np.ndarray
    row_starts: np.ndarray
    stats: dict

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start, end = int(self.row_starts[index]), int(self.row_starts[index + 1])
        ids, trained = self.token_ids[start:end], self.trained[start + 1 : end]
        return {
            "input_ids": np.array(ids[:-1], np.int32),
            "target_ids": np.where(trained, ids[1:], 0).astype(np.int32),
            "loss_mask": trained.astype(np.int32),
        }

    @property
    def examples(self) -> EncodedData:
        """The examples themselves (this object is a sequence of them)."""
        return self

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example after the shift."""
        return np.diff(self.row_starts) - 1

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def trained_tokens(self) -> int:
        return int(self.trained.sum() - self.trained[self.row_starts[:-1]].sum()) if len(self) else 0

    @property
    def drops(self) -> collections.Counter:
        return collections.Counter(self.stats["drops"])

    @property
    def total_rows(self) -> int:
        return self.stats["total_rows"]


# One encoder per worker process, built by `_start_worker`.
_worker_encoder: ChatEncoder | None = None


def _start_worker(tokenizer, chat_template: str | None, train_on: str) -> None:
    global _worker_encoder
    _worker_encoder = ChatEncoder(tokenizer, chat_template, None, train_on)


def _encode_chunk(task: tuple[list[tuple[object, object]], int]) -> dict:
    """Encodes rows (messages, tools), truncated to `max_tokens`; reports each drop and truncation."""
    rows, max_tokens = task
    ids, trained, lengths, drops, truncated = [], [], [], [], 0
    fallbacks_before = _worker_encoder.fallbacks
    for position, (messages, tools) in enumerate(rows):
        try:
            encoded = _worker_encoder.encode(messages, tools)
        except BadRow as e:
            drops.append((position, e.reason, str(e)))
            continue
        row_ids = encoded["input_ids"][:max_tokens]
        row_trained = encoded["labels"][:max_tokens] >= 0
        if not row_trained[1:].any():  # the first token is never a target after the shift
            reason = "over_length" if len(encoded["input_ids"]) > max_tokens else "no_trained_token"
            drops.append((position, reason, f"no trained token in the first {max_tokens} tokens"))
            continue
        truncated += len(encoded["input_ids"]) > max_tokens
        ids.append(row_ids)
        trained.append(row_trained)
        lengths.append(len(row_ids))
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "trained": np.concatenate(trained) if trained else np.zeros(0, bool),
        "lengths": np.array(lengths, np.int64),
        "drops": drops,
        "truncated": truncated,
        "trained_tokens": int(sum(t[1:].sum() for t in trained)),
        "fallbacks": _worker_encoder.fallbacks - fallbacks_before,
    }


def _row_tasks(ds, indices: np.ndarray, max_tokens: int):
    """Chunks of (messages, tools) rows, read from the data set in order."""
    selected = ds.select(indices)
    for batch in selected.iter(batch_size=CHUNK_ROWS):
        columns = list(batch)
        rows = [{c: batch[c][j] for c in columns} for j in range(len(batch[columns[0]]))]
        yield [(sources.row_messages(r), r.get("tools")) for r in rows], max_tokens


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encode_mixture(
    mixer,
    tokenizer,
    max_seq_length: int,
    chat_template: str | None,
    seed: int,
    max_bad_fraction: float,
    *,
    train_on: str = "all_assistant_turns",
    num_proc: int = 1,
) -> EncodedData:
    """Encodes every drawn row, in `num_proc` processes; bad rows are counted by reason.

    Rows are truncated on the right to one token more than a training row holds (the shift to
    (input, target) pairs drops one). More bad rows than `max_bad_fraction` is an error.
    """
    started = time.perf_counter()
    chat_template = resolve_template(chat_template)
    max_tokens = max_seq_length + 1
    drawn = sources.mix(mixer, seed)
    total = sum(len(indices) for _, _, indices in drawn)
    num_proc = max(1, min(num_proc or default_num_proc(), total // MIN_ROWS_PER_PROCESS))
    ids, trained, lengths, row_sources = [], [], [], []
    drops, truncated, fallbacks, first_bad = collections.Counter(), 0, 0, None
    per_source = []

    if num_proc > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            num_proc, initializer=_start_worker, initargs=(tokenizer, chat_template, train_on)
        )
        run = pool.imap
    else:
        pool = None
        _start_worker(tokenizer, chat_template, train_on)
        run = map
    try:
        with tqdm.tqdm(total=total, desc="encoding", leave=False, mininterval=2.0) as bar:
            for source_index, (source, ds, indices) in enumerate(drawn):
                kept = kept_tokens = kept_trained = 0
                offset = 0
                for out in run(_encode_chunk, _row_tasks(ds, indices, max_tokens)):
                    for position, reason, detail in out["drops"]:
                        drops[reason] += 1
                        first_bad = first_bad or f"{source} row {indices[offset + position]}: {detail}"
                    offset += len(out["lengths"]) + len(out["drops"])
                    ids.append(out["ids"])
                    trained.append(out["trained"])
                    lengths.append(out["lengths"])
                    row_sources.append(np.full(len(out["lengths"]), source_index, np.int32))
                    truncated += out["truncated"]
                    fallbacks += out["fallbacks"]
                    kept += len(out["lengths"])
                    kept_tokens += len(out["ids"]) - len(out["lengths"])  # counted after the shift
                    kept_trained += out["trained_tokens"]
                    bar.update(len(out["lengths"]) + len(out["drops"]))
                per_source.append(
                    {
                        "source": source,
                        "rows_in_source": len(ds),
                        "rows_drawn": len(indices),
                        "rows_kept": kept,
                        "tokens": kept_tokens,
                        "trained_tokens": kept_trained,
                    }
                )
                log.info(
                    "source %s: %d rows drawn of %d, %d kept, %d tokens (%d trained)",
                    source,
                    len(indices),
                    len(ds),
                    kept,
                    kept_tokens,
                    kept_trained,
                )
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    if drops:
        log.warning(
            "dropped %d of %d rows: %s (first: %s)", sum(drops.values()), total, dict(drops), first_bad
        )
    check_bad_fraction({"total_rows": total, "drops": drops, "first_bad": first_bad}, max_bad_fraction)
    row_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if not len(row_lengths):
        raise sources.DataError(f"no trainable rows in {[s for s, _ in mixer]}")
    stats = {
        "total_rows": total,
        "drops": dict(drops),
        "first_bad": first_bad,
        "repairs": {"truncated": truncated} if truncated else {},
        "sources": per_source,
        "fallbacks_to_incremental": fallbacks,
        "encode_seconds": round(time.perf_counter() - started, 3),
    }
    data = EncodedData(
        token_ids=np.concatenate(ids).astype(np.int32),
        trained=np.concatenate(trained).astype(bool),
        row_starts=np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64),
        stats=stats,
    )
    data.stats.update(summary(data))
    return data


def check_bad_fraction(stats: dict, max_bad_fraction: float) -> None:
    """Fails with the first bad row when more than `max_bad_fraction` of the rows were dropped."""
    bad, total = sum(stats["drops"].values()), stats["total_rows"]
    if total and bad > max_bad_fraction * total:
        raise sources.DataError(
            f"{bad} of {total} rows are bad, more than data.max_bad_fraction={max_bad_fraction}; "
            f"first: {stats['first_bad']}"
        )


def summary(data: EncodedData) -> dict:
    """Rows, tokens, trained tokens and length percentiles (example lengths after the shift)."""
    lengths = data.lengths
    percentiles = (50, 90, 99, 100)
    return {
        "rows": len(data),
        "tokens": data.tokens,
        "trained_tokens": data.trained_tokens,
        "length_percentiles": {f"p{p}": int(np.percentile(lengths, p)) for p in percentiles},
        "mean_length": round(float(lengths.mean()), 1),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the full tokenizer definition and special tokens."""
    backend = getattr(tokenizer, "_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map], sort_keys=True, default=str)
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def template_text(tokenizer, chat_template: str | None) -> str:
    """The template that will actually render rows: the chosen one or the tokenizer's own."""
    try:
        return tokenizer.get_chat_template(resolve_template(chat_template))
    except ValueError as e:
        raise sources.DataError(f"{e} Set data.chat_template to 'tulu', 'chatml' or a Jinja file.") from None


def cache_key(mixer, tokenizer, *, chat_template, max_seq_length: int, train_on: str, seed: int) -> str:
    """The hash of everything the encoded rows depend on (sources by content, amounts by type too)."""
    parts = {
        "version": CACHE_VERSION,
        "sources": [(sources.fingerprint(s), repr(a)) for s, a in mixer],
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_text(tokenizer, chat_template),
        "max_seq_length": max_seq_length,
        "train_on": train_on,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("JSFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jsft", "data"))


def save(data: EncodedData, folder: str) -> None:
    """Writes the arrays and stats into a temporary sibling folder, then renames it into place."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for name in _ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), getattr(data, name))
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(data.stats, f, indent=1)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "stats.json")):  # not another process winning the race
            raise


def load(folder: str) -> EncodedData:
    """Maps a cached data set's arrays into memory (read-only, shared between readers)."""
    arrays = {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r") for name in _ARRAYS}
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    return EncodedData(stats=stats, **arrays)


def prepare(data_cfg, tokenizer, *, seed: int, mixer=None, cache_dir: str | None = None) -> EncodedData:
    """The encoded rows of `mixer` (default `data_cfg.mixer`), from the cache or encoded into it.

    `data_cfg` is the config's `data` group. Every process may call this: the cache is written
    atomically, so concurrent builders cannot corrupt it, and a finished cache is only read.
    """
    mixer = tuple(data_cfg.mixer if mixer is None else mixer)
    settings = dict(
        chat_template=data_cfg.chat_template,
        max_seq_length=data_cfg.max_seq_length,
        train_on=data_cfg.train_on,
        seed=seed,
    )
    folder = os.path.join(
        cache_dir or data_cfg.cache_dir or default_cache_dir(), cache_key(mixer, tokenizer, **settings)
    )
    if os.path.isfile(os.path.join(folder, "stats.json")):
        log.info("encoded data from cache %s", folder)
        cached = load(folder)
        check_bad_fraction(cached.stats, data_cfg.max_bad_fraction)  # not in the key: checked on every use
        return cached
    data = encode_mixture(
        mixer,
        tokenizer,
        data_cfg.max_seq_length,
        data_cfg.chat_template,
        seed,
        data_cfg.max_bad_fraction,
        train_on=data_cfg.train_on,
        num_proc=data_cfg.num_proc,
    )
    data.stats["cache_folder"] = folder
    save(data, folder)
    log.info("encoded data cached in %s", folder)
    return load(folder)
