"""From mixer entries to encoded rows on disk, once per data set, tokenizer and template.

`prepare` is the entry point: it hashes everything the encoded rows depend on into a cache key, and
either maps the cached arrays (a second run, or another host sharing the cache folder) or encodes
the mixture in parallel worker processes and writes the cache atomically (`cache` holds the stored
format, the key and the writes). Workers are spawned, not forked, so a parent that has started JAX
threads cannot deadlock them.

Environment failures (a missing package, an unreadable file, a worker that cannot start) stop the
run with their cause; only faults of a row itself are dropped and counted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import time

import numpy as np
import tqdm
from etils import epath

from jsft import config, paths
from jsft.data import sources
from jsft.data.cache import EncodedData, default_cache_dir, download, key_for, load, save, upload
from jsft.data.masking import ChatEncoder
from jsft.data.templates import resolve_template
from jsft.errors import BadRow, DataError, JsftError, SetupError, one_line

log = logging.getLogger(__name__)

CHUNK_ROWS = 256  # rows per task sent to a worker process
MIN_ROWS_PER_PROCESS = 1000  # below this, spawning workers costs more than it saves
SETUP_CHECK_ROWS = 64  # a source whose first rows all fail for one reason stops the run


# One encoder per worker process, built by `_start_worker`, or the error that kept it from being built.
_worker_encoder: ChatEncoder | None = None
_worker_error: JsftError | None = None
_worker_max_chars = config.MAX_ROW_CHARS


def _start_worker(
    tokenizer,
    chat_template: str | None,
    train_on: str,
    on_unlocated_turn: str,
    max_row_chars: int = config.MAX_ROW_CHARS,
) -> None:
    """Builds the worker's encoder. Never raises: a pool respawns workers whose initializer fails
    without end, so the error is kept and raised by the first task instead."""
    global _worker_encoder, _worker_error, _worker_max_chars
    _worker_max_chars = max_row_chars
    # Ctrl-C reaches the whole process group: the run (not its workers) decides to save and stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker_encoder = ChatEncoder(tokenizer, chat_template, None, train_on, on_unlocated_turn)
        _worker_error = None
    except Exception as e:
        detail = str(e) if isinstance(e, JsftError) else one_line(e, with_type=True)
        _worker_encoder, _worker_error = None, SetupError(f"a tokenization worker could not start: {detail}")


def _encode_row(row: object, where: str, row_format: sources.RowFormat) -> dict:
    size = len(row) if isinstance(row, (bytes, str)) else len(json.dumps(row, default=str))
    if size > _worker_max_chars:  # before parsing and rendering, whose time grows with the row
        raise BadRow(
            "over_max_row_chars", f"{size} characters, more than data.max_row_chars={_worker_max_chars}"
        )
    row = sources.parse_row(row, where)
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"a row must be an object, got {type(row).__name__}")
    example = row_format.convert(row)
    if isinstance(example, sources.Document):
        return _worker_encoder.encode_text(example.text)
    return _worker_encoder.encode(example.messages, example.tools, example.trainable_from)


def _encode_chunk(task: tuple[list[tuple[object, str]], sources.RowFormat, int]) -> dict:
    """Encodes rows truncated to `max_tokens`; reports each drop, untrained turn and truncation."""
    if _worker_error is not None:
        raise _worker_error
    rows, row_format, max_tokens = task
    ids, trained, lengths, drops, truncated = [], [], [], [], 0
    untrained_turns = collections.Counter()
    for position, (row, where) in enumerate(rows):
        try:
            encoded = _encode_row(row, where, row_format)
        except BadRow as e:
            drops.append((position, e.reason, str(e)))
            continue
        except RecursionError:  # nested deeper than Python parses or renders: the row, not the run
            drops.append((position, "too_deep", "too_deep: nested deeper than the recursion limit"))
            continue
        row_ids = encoded["input_ids"][:max_tokens]
        row_trained = encoded["labels"][:max_tokens] >= 0
        if not row_trained[1:].any():  # the first token is never a target after the shift
            reason = "over_length" if len(encoded["input_ids"]) > max_tokens else "no_trained_token"
            drops.append((position, reason, f"no trained token in the first {max_tokens} tokens"))
            continue
        untrained_turns.update(encoded["untrained_turns"])
        truncated += len(encoded["input_ids"]) > max_tokens
        ids.append(row_ids)
        trained.append(row_trained)
        lengths.append(len(row_ids))
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "trained": np.concatenate(trained) if trained else np.zeros(0, bool),
        "lengths": np.array(lengths, np.int64),
        "drops": drops,
        "untrained_turns": dict(untrained_turns),
        "truncated": truncated,
        "trained_tokens": int(sum(t[1:].sum() for t in trained)),
    }


def _row_tasks(drawn: sources.Drawn, max_tokens: int):
    """Chunks of raw rows with their labels, read in the order drawn."""
    for rows in drawn.rows.rows(drawn.indices, CHUNK_ROWS):
        yield rows, drawn.format, max_tokens


def _chunk_results(tasks, num_proc: int, initargs: tuple):
    """`_encode_chunk` of each task in order, in `num_proc` spawned processes (here if 1)."""
    if num_proc == 1:
        _start_worker(*initargs)
        yield from map(_encode_chunk, tasks)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        num_proc, multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=initargs
    )
    pending = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_encode_chunk, task))
            if len(pending) > 2 * num_proc:  # bounded: rows are read as the workers need them
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool as e:
        raise SetupError(
            f"a tokenization worker process died ({one_line(e, with_type=True)}); "
            "data.num_proc=1 encodes in this process and shows the cause"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass
class _SourceTally:
    """What happened to one source's rows while encoding."""

    drawn: sources.Drawn
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    seen: int = 0
    drops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    untrained_turns: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_bad: str | None = None
    early_reasons: list = dataclasses.field(default_factory=list)  # drop reasons of the first rows

    def add(self, out: dict, labels: list[str]) -> None:
        for position, reason, detail in out["drops"]:
            self.drops[reason] += 1
            self.first_bad = self.first_bad or f"{labels[position]}: {detail}"
            if self.seen + position < SETUP_CHECK_ROWS:
                self.early_reasons.append((reason, detail, labels[position]))
        self.untrained_turns.update(out["untrained_turns"])
        self.kept += len(out["lengths"])
        self.tokens += len(out["ids"]) - len(out["lengths"])  # counted after the shift
        self.trained_tokens += out["trained_tokens"]
        self.truncated += out["truncated"]
        self.seen += len(labels)
        self.check_setup()

    def check_setup(self) -> None:
        """The first rows of a source all failing for one reason is the setup's fault, not the rows'."""
        early = self.early_reasons
        if (
            self.seen >= SETUP_CHECK_ROWS
            and len(early) == SETUP_CHECK_ROWS
            and len({r for r, _, _ in early}) == 1
        ):
            reason, detail, where = early[0]
            raise SetupError(
                f"the first {SETUP_CHECK_ROWS} rows of {self.drawn.source} (format "
                f"{self.drawn.format.describe()}) all fail with {reason}, so the setup is wrong (template, "
                f"tokenizer, row format, max_seq_length), not the rows; first: {where}: {detail}"
            )

    def report(self, lengths: np.ndarray) -> dict:
        return {
            "source": self.drawn.source,
            "format": self.drawn.format.describe(),
            "rows_in_source": len(self.drawn.rows),
            "rows_drawn": len(self.drawn.indices),
            "rows_kept": self.kept,
            "drops": dict(self.drops),
            "untrained_turns": dict(self.untrained_turns),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_share": round(self.trained_tokens / max(self.tokens, 1), 4),
            "length_percentiles": length_percentiles(lengths),
        }


def encode_mixture(
    mixer,
    tokenizer,
    max_seq_length: int,
    chat_template: str | None,
    seed: int,
    max_bad_fraction: float,
    *,
    train_on: str = "all_assistant_turns",
    on_unlocated_turn: str = "drop_row",
    num_proc: int = 1,
    max_row_chars: int = config.MAX_ROW_CHARS,
) -> EncodedData:
    """Encodes every drawn row, in `num_proc` processes; bad rows and untrained turns are counted by reason.

    Rows are truncated on the right to one token more than a training row holds (the shift to
    (input, target) pairs drops one). More bad rows than `max_bad_fraction` is an error, and so is a
    source whose first rows all fail for one reason (`SETUP_CHECK_ROWS`).
    """
    started = time.perf_counter()
    chat_template = resolve_template(chat_template)
    initargs = (tokenizer, chat_template, train_on, on_unlocated_turn, max_row_chars)
    ChatEncoder(tokenizer, chat_template, None, train_on, on_unlocated_turn)  # bad settings fail here, once
    drawn = sources.mix(mixer, seed)
    total = sum(len(d.indices) for d in drawn)
    num_proc = max(1, min(num_proc or default_num_proc(), total // MIN_ROWS_PER_PROCESS))
    tallies = [_SourceTally(d) for d in drawn]
    ids, trained, lengths, row_sources = _encode_sources(tallies, max_seq_length + 1, num_proc, initargs)
    drops = sum((t.drops for t in tallies), collections.Counter())
    first_bad = next((t.first_bad for t in tallies if t.first_bad), None)
    _log_sources(tallies, total, drops, first_bad)
    check_bad_fraction({"total_rows": total, "drops": drops, "first_bad": first_bad}, max_bad_fraction)
    row_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if not len(row_lengths):
        raise DataError(f"no trainable rows in {[d.source for d in drawn]}")
    row_source_ids = np.concatenate(row_sources)
    untrained_turns = sum((t.untrained_turns for t in tallies), collections.Counter())
    truncated = sum(t.truncated for t in tallies)
    stats = {
        "total_rows": total,
        "drops": dict(drops),
        "untrained_turns": dict(untrained_turns),
        "first_bad": first_bad,
        "repairs": {"truncated": truncated} if truncated else {},
        "sources": [t.report(row_lengths[row_source_ids == i] - 1) for i, t in enumerate(tallies)],
        "encode_seconds": round(time.perf_counter() - started, 3),
    }
    data = EncodedData(
        token_ids=np.concatenate(ids).astype(np.int32),
        trained=np.concatenate(trained).astype(bool),
        row_starts=np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64),
        row_sources=row_source_ids,
        stats=stats,
    )
    data.stats.update(summary(data))
    return data


def _encode_sources(
    tallies: list[_SourceTally], max_tokens: int, num_proc: int, initargs: tuple
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Encodes the drawn rows of each tally's source in order, adding every chunk to its tally.

    Returns the chunks' token ids, trained flags, row lengths and row sources, in the order drawn.
    """
    ids, trained, lengths, row_sources = [], [], [], []
    labels = collections.deque()  # (source index, row labels) of each task sent, in order

    def tasks():
        for source_index, tally in enumerate(tallies):
            for task in _row_tasks(tally.drawn, max_tokens):
                labels.append((source_index, [where for _, where in task[0]]))
                yield task

    total = sum(len(t.drawn.indices) for t in tallies)
    with tqdm.tqdm(total=total, desc="encoding", leave=False, mininterval=2.0) as bar:
        for out in _chunk_results(tasks(), num_proc, initargs):
            source_index, chunk_labels = labels.popleft()
            tallies[source_index].add(out, chunk_labels)
            ids.append(out["ids"])
            trained.append(out["trained"])
            lengths.append(out["lengths"])
            row_sources.append(np.full(len(out["lengths"]), source_index, np.int32))
            bar.update(len(chunk_labels))
    return ids, trained, lengths, row_sources


def _log_sources(tallies: list, total: int, drops: collections.Counter, first_bad) -> None:
    for tally in tallies:
        log.info(
            "source %s: %d rows drawn of %d, %d kept, %d tokens (%d trained)%s",
            tally.drawn.source,
            len(tally.drawn.indices),
            len(tally.drawn.rows),
            tally.kept,
            tally.tokens,
            tally.trained_tokens,
            f"; drops {dict(tally.drops)}" if tally.drops else "",
        )
    if drops:
        log.warning(
            "dropped %d of %d rows: %s (first: %s)", sum(drops.values()), total, dict(drops), first_bad
        )


def check_bad_fraction(stats: dict, max_bad_fraction: float) -> None:
    """Fails with the first bad row when more than `max_bad_fraction` of the rows were dropped."""
    bad, total = sum(stats["drops"].values()), stats["total_rows"]
    if total and bad > max_bad_fraction * total:
        raise DataError(
            f"{bad} of {total} rows are bad, more than data.max_bad_fraction={max_bad_fraction}; "
            f"first: {stats['first_bad']}"
        )


def length_percentiles(lengths: np.ndarray) -> dict[str, int]:
    if not len(lengths):
        return {}
    return {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99, 100)}


def summary(data: EncodedData) -> dict:
    """Rows, tokens, trained tokens and length percentiles (example lengths after the shift)."""
    lengths = data.lengths
    return {
        "rows": len(data),
        "tokens": data.tokens,
        "trained_tokens": data.trained_tokens,
        "length_percentiles": length_percentiles(lengths),
        "mean_length": round(float(lengths.mean()), 1),
    }


def prepare(data_cfg, tokenizer, *, seed: int, mixer=None, cache_dir: str | None = None) -> EncodedData:
    """The encoded rows of `mixer` (default `data_cfg.mixer`), from the cache or encoded into it.

    Mixer entries are `(source, amount)` or `(source, amount, format)` (see `sources`).

    `data_cfg` is the config's `data` group. Every process may call this: the cache is written
    atomically, so concurrent builders cannot corrupt it, and a finished cache is only read.
    """
    mixer = tuple(data_cfg.mixer if mixer is None else mixer)
    key = key_for(data_cfg, tokenizer, seed=seed, mixer=mixer)
    root = cache_dir or data_cfg.cache_dir or default_cache_dir()
    # Arrays are memory-mapped, so they are read from local disk; a gs:// (or other object store) cache
    # is mirrored into the local cache folder, and written back after encoding.
    shared = epath.Path(root) / key if paths.is_remote(root) else None
    folder = os.path.join(default_cache_dir(), "mirror", key) if shared else os.path.join(root, key)
    if shared and not os.path.isfile(os.path.join(folder, "stats.json")) and (shared / "stats.json").exists():
        download(shared, folder)
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
        on_unlocated_turn=data_cfg.on_unlocated_turn,
        num_proc=data_cfg.num_proc,
        max_row_chars=data_cfg.max_row_chars,
    )
    data.stats["cache_folder"] = str(shared or folder)
    try:
        save(data, folder)
        if shared:
            upload(folder, shared)
    except OSError as e:  # the disk, not the rows: nothing half-written stays behind to be read later
        raise SetupError(
            f"writing the encoded-data cache {shared or folder} failed: {one_line(e)} "
            "(a full disk? set data.cache_dir or JSFT_CACHE to a folder with room)"
        ) from e
    log.info("encoded data cached in %s", shared or folder)
    return load(folder)
