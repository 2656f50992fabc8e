"""The run's steps and the rows a step compiles for, from the data cache or the data's stated size.

Reads the data cache's lengths when it is built (never encodes anything), else `--examples` and
`--mean_tokens`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import transformers

from jsft import data
from jsft.data import cache
from jsft.data.batching import Batching
from jsft.data.pipeline import row_bucket


@dataclasses.dataclass(frozen=True)
class DataPlan:
    steps_per_epoch: int | None  # None: unknown (no data cache, no --examples)
    total_steps: int | None
    note: str  # where the figures come from
    packed_rows: list[int] | None = None  # batch_unit=examples: each batch's rows (data.example_batch_rows)
    mean_tokens: float = 0.0  # --mean_tokens, when only that is known


def data_plan(cfg, examples: int = 0, mean_tokens: float = 0.0) -> DataPlan:
    """Steps per epoch and in total: the packer run over the data cache's lengths when the cache is
    built, else from `examples` x `mean_tokens`, else only `train.max_steps` if set."""
    rows, seq = cfg.train.global_batch_size, cfg.data.max_seq_length
    by_examples = cfg.train.batch_unit == "examples"  # then global_batch_size counts conversations
    cached, why = _cached_examples(cfg)
    if cached is not None:
        per_epoch = (
            len(cached) // rows
            if by_examples
            else data.count_batches(
                cached.examples,
                batch_size=rows,
                max_seq_length=seq,
                packing=cfg.data.packing,
                packer=cfg.data.packer,
                seed=cfg.train.seed,
            )
        )
        note = f"from the data cache ({len(cached)} conversations, {cached.tokens} tokens)"
    elif examples:
        slots = rows * seq
        per_epoch = (
            examples // rows
            if by_examples or not cfg.data.packing
            else math.ceil(examples * min(mean_tokens, seq) / slots)
        )
        note = f"estimated from --examples={examples} --mean_tokens={mean_tokens:g}"
        if cfg.data.packing and not by_examples:
            note += " (rows packed full: a lower bound)"
    else:
        per_epoch = None
        note = f"unknown: {why}; run `python -m jsft.prepare` first, or pass --examples=N --mean_tokens=T"
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else (per_epoch and per_epoch * cfg.train.epochs)
    packed_rows = None
    if cached is not None and by_examples:  # once here: the search asks for every mesh's bucket
        packed_rows = data.example_batch_rows(
            cached.examples, batch_size=rows, max_seq_length=seq, seed=cfg.train.seed
        )
    return DataPlan(per_epoch, total, note, packed_rows, mean_tokens)


def step_rows(trainer, steps: DataPlan | None = None) -> tuple[int, str]:
    """(the rows of the global batch to compile, how they were found).

    With `train.batch_unit="rows"` that is `global_batch_size`. With "examples" a step's conversations
    are packed into a bucketed number of rows (`data.example_batches`): the largest of one epoch over
    the data cache's lengths; else the mean length's estimate; else the worst case, one row each."""
    cfg = trainer.cfg
    batch, seq = cfg.train.global_batch_size, cfg.data.max_seq_length
    if cfg.train.batch_unit == "rows":
        return batch, ""
    multiple = Batching.from_config(cfg, trainer.mesh).row_multiple
    if steps is not None and steps.packed_rows:
        counts = [row_bucket(n, multiple) for n in steps.packed_rows]
        shapes = ", ".join(f"{r} rows x{counts.count(r)}" for r in sorted(set(counts)))
        return max(counts), f"the largest of one epoch's packed batches ({shapes})"
    if steps is not None and steps.mean_tokens:
        needed = math.ceil(batch * min(steps.mean_tokens, seq) / seq)
        return row_bucket(
            needed, multiple
        ), "packed at the mean length (batches of longer ones take more rows)"
    return row_bucket(batch, multiple), "the worst case, each conversation in a row of its own"


def _cached_examples(cfg):
    """(the encoded training data if its cache is built, else None and why not). Loads the tokenizer
    from a local or cached model folder to find the cache's key; never encodes anything."""
    local = os.path.isdir(cfg.model.path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            cfg.model.path, revision=cfg.model.revision or None, local_files_only=not local
        )
    except (OSError, ValueError):
        return None, f"the tokenizer of {cfg.model.path} is not here to find the data cache"
    try:
        key = cache.cache_key(
            cfg.data.mixer,
            tokenizer,
            chat_template=cfg.data.chat_template,
            max_seq_length=cfg.data.max_seq_length,
            train_on=cfg.data.train_on,
            seed=cfg.train.seed,
            on_unlocated_turn=cfg.data.on_unlocated_turn,
        )
    except (OSError, ValueError) as e:
        return None, f"cannot compute the data cache key ({' '.join(str(e).split())[:120]})"
    root = cfg.data.cache_dir or cache.default_cache_dir()
    entry = os.path.join(root, key)
    if not os.path.isfile(os.path.join(entry, "stats.json")):
        return None, f"the data cache {entry} is not built"
    return cache.load(entry), ""
