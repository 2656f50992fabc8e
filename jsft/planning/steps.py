"""The run's steps and the rows a step compiles for, from the data cache or the data's stated size.

Reads the data cache's lengths when it is built (never encodes anything), else `--examples` and
`--mean_tokens`.
"""

from __future__ import annotations

import dataclasses
import os

import transformers

from jsft.data import cache
from jsft.data.batching import Batching


@dataclasses.dataclass(frozen=True)
class DataPlan:
    steps_per_epoch: int | None  # None: unknown (no data cache, no --examples)
    total_steps: int | None
    note: str  # where the figures come from
    packed_rows: list[int] | None = None  # counted in conversations: each batch's rows, unbucketed
    mean_tokens: float = 0.0  # --mean_tokens, when only that is known


def data_plan(cfg, examples: int = 0, mean_tokens: float = 0.0) -> DataPlan:
    """Steps per epoch and in total: the packer run over the data cache's lengths when the cache is
    built, else from `examples` x `mean_tokens`, else only `train.max_steps` if set."""
    batching = Batching.from_config(cfg)  # step counts do not depend on the mesh
    cached, why = _cached_examples(cfg)
    packed_rows = None
    if cached is not None:
        per_epoch = batching.local_steps_per_epoch(cached.examples)
        note = f"from the data cache ({len(cached)} conversations, {cached.tokens} tokens)"
        packed_rows = batching.epoch_packed_rows(cached.examples)  # once: the search asks for every mesh
    elif examples:
        per_epoch, lower_bound = batching.estimated_steps_per_epoch(examples, mean_tokens)
        note = f"estimated from --examples={examples} --mean_tokens={mean_tokens:g}"
        if lower_bound:
            note += " (rows packed full: a lower bound)"
    else:
        per_epoch = None
        note = f"unknown: {why}; run `jsft-prepare` first, or pass --examples=N --mean_tokens=T"
    return DataPlan(per_epoch, batching.total_steps(per_epoch), note, packed_rows, mean_tokens)


def step_rows(trainer, steps: DataPlan | None = None) -> tuple[int, str]:
    """(the rows of the global batch to compile, how they were found): `Batching.step_rows` on the
    trainer's mesh, from one epoch's packed batches or the mean length where the plan knows them."""
    batching = Batching.from_config(trainer.cfg, trainer.mesh)
    if steps is None:
        return batching.step_rows()
    return batching.step_rows(steps.packed_rows, steps.mean_tokens)


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
        key = cache.key_for(cfg.data, tokenizer, seed=cfg.train.seed)
    except (OSError, ValueError) as e:
        return None, f"cannot compute the data cache key ({' '.join(str(e).split())[:120]})"
    root = cfg.data.cache_dir or cache.default_cache_dir()
    entry = os.path.join(root, key)
    if not os.path.isfile(os.path.join(entry, "stats.json")):
        return None, f"the data cache {entry} is not built"
    return cache.load(entry), ""
