"""From conversations to packed, sharded training batches.

Encoding turns each conversation into (input_ids, labels), shifted here once into what the step
needs: `input_ids` (tokens 0..n-2), `target_ids` (tokens 1..n-1) and `loss_mask` (1 where the target
is an assistant token). Shifting before packing means no target ever crosses into the next example.
Grain then shuffles per epoch, packs examples into rows of `max_seq_length` with per-example
`segment_ids` (0 = padding) and `positions`, and batches the rows. Each process reads its own share.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import grain
import numpy as np
import tqdm

from jsft.data import sources
from jsft.data.chat import IGNORE, BadRow, encode_messages

log = logging.getLogger(__name__)

FEATURES = ("input_ids", "target_ids", "loss_mask")


@dataclasses.dataclass
class EncodedData:
    examples: list[dict[str, np.ndarray]]
    drops: collections.Counter
    total_rows: int

    @property
    def trained_tokens(self) -> int:
        return int(sum(e["loss_mask"].sum() for e in self.examples))

    @property
    def tokens(self) -> int:
        return int(sum(len(e["input_ids"]) for e in self.examples))


def to_example(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids, labels = encoded["input_ids"], encoded["labels"]
    targets = labels[1:]
    return {
        "input_ids": ids[:-1].astype(np.int32),
        "target_ids": np.where(targets == IGNORE, 0, targets).astype(np.int32),
        "loss_mask": (targets != IGNORE).astype(np.int32),
    }


def encode_mixture(
    mixer, tokenizer, max_seq_length: int, chat_template: str | None, seed: int, max_bad_fraction: float
) -> EncodedData:
    """Encodes every drawn row; bad rows are counted by reason, and too many of them is an error."""
    examples, drops, first_bad, total = [], collections.Counter(), None, 0
    for source, ds, indices in sources.mix(mixer, seed):
        rows = ds.select(indices) if len(indices) else []
        for row_index, row in zip(
            indices, tqdm.tqdm(rows, desc=f"encoding {source}", leave=False), strict=False
        ):
            total += 1
            try:
                # one token more than a row holds: the shift to (input, target) pairs drops one
                encoded = encode_messages(row["messages"], tokenizer, max_seq_length + 1, chat_template)
            except BadRow as e:
                drops[e.reason] += 1
                first_bad = first_bad or f"{source} row {row_index}: {e}"
                continue
            example = to_example(encoded)
            if not example["loss_mask"].any():
                drops["no_trained_token_after_truncation"] += 1
                continue
            examples.append(example)
    if drops:
        log.warning(
            "dropped %d of %d rows: %s (first: %s)", sum(drops.values()), total, dict(drops), first_bad
        )
    if total and sum(drops.values()) > max_bad_fraction * total and first_bad:
        raise sources.DataError(
            f"{sum(drops.values())} of {total} rows are bad, "
            f"more than data.max_bad_fraction={max_bad_fraction}; "
            f"first: {first_bad}"
        )
    if not examples:
        raise sources.DataError(f"no trainable rows in {[s for s, _ in mixer]}")
    return EncodedData(examples, drops, total)


def _rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packer adds `<key>_segment_ids` and `<key>_positions`; the step wants one of each."""
    out = {k: batch[k] for k in FEATURES}
    out["segment_ids"] = batch["input_ids_segment_ids"]
    out["positions"] = batch["input_ids_positions"]
    return out


def _pad_one(example: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    n = len(example["input_ids"])
    out = {k: np.pad(v, (0, length - n)) for k, v in example.items()}
    out["input_ids_segment_ids"] = np.pad(np.ones(n, np.int32), (0, length - n))
    out["input_ids_positions"] = np.pad(np.arange(n, dtype=np.int32), (0, length - n))
    return out


def batches(
    examples: list[dict[str, np.ndarray]],
    *,
    batch_size: int,
    max_seq_length: int,
    packing: bool,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Batches of `batch_size` rows of `max_seq_length` from this shard's examples.

    With `num_epochs=None` the data repeats forever, reshuffled each epoch; a finite pass keeps its
    last, partial batch, padded with empty rows, so that evaluation sees every example.
    """
    ds = grain.MapDataset.source(examples)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if packing:
        rows = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(),
            length_struct=dict.fromkeys(FEATURES, max_seq_length),
            num_packing_bins=batch_size,
            seed=seed,
            shuffle_bins=shuffle,
        )
    else:
        rows = ds.map(lambda e: _pad_one(e, max_seq_length)).to_iter_dataset()
    if num_epochs is not None:
        rows = rows.batch(batch_size, drop_remainder=False, batch_fn=lambda rs: _stack_padded(rs, batch_size))
    else:
        rows = rows.batch(batch_size, drop_remainder=True)
    return rows.map(_rename)


def _stack_padded(rows: list[dict], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch, topped up with all-padding rows (segment 0, no trained token)."""
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows = list(rows) + [empty] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def count_batches(examples, **kwargs) -> int:
    """Batches in one epoch of this shard, found by running the packer over lengths only."""
    stubs = [{k: np.zeros(len(e["input_ids"]), np.int32) for k in FEATURES} for e in examples]
    return sum(1 for _ in batches(stubs, num_epochs=1, **kwargs))
