"""From conversations to packed, sharded training batches.

The examples arrive already shifted (`preprocess.shifted`: `input_ids`, `target_ids`, `loss_mask`).
Grain shuffles per epoch, packs examples into rows of `max_seq_length` with per-example
`segment_ids` (0 = padding) and `positions`, and batches the rows. Each process reads its own share.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from jsft.errors import JsftError

FEATURES = ("input_ids", "target_ids", "loss_mask")
# Examples are slices of arrays in memory: reading them inline beats Grain's prefetch threads, whose
# polling costs about 0.5 ms per example.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}


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
    examples: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    max_seq_length: int,
    packing: bool,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    packer: str = "first_fit",
) -> grain.IterDataset:
    """Batches of `batch_size` rows of `max_seq_length` from this shard's examples.

    Shard `shard_index` of `shard_count` (one per JAX process) holds every shard_count-th example.
    With `num_epochs=None` the data repeats forever, reshuffled each epoch from `seed`; a finite pass
    keeps its last, partial batch, padded with empty rows, so that evaluation sees every example.
    `iter()` of the result is a Grain iterator whose `get_state`/`set_state` resume exactly.
    """
    if packer not in PACKERS:
        raise JsftError(f"data.packer must be one of {', '.join(PACKERS)}, got {packer!r}")
    ds = grain.MapDataset.source(examples)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if packing:
        rows = PACKERS[packer](
            ds.to_iter_dataset(READ_OPTIONS),
            length_struct=dict.fromkeys(FEATURES, max_seq_length),
            num_packing_bins=batch_size,
            seed=seed,
            shuffle_bins=shuffle,
        )
    else:
        rows = ds.map(lambda e: _pad_one(e, max_seq_length)).to_iter_dataset(READ_OPTIONS)
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


class _LengthStubs(Sequence):
    """Examples of the right lengths made of shared zeros: enough to run the packer cheaply."""

    def __init__(self, lengths: np.ndarray):
        self.lengths = np.asarray(lengths)
        self.zeros = np.zeros(int(self.lengths.max(initial=0)), np.int32)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        stub = self.zeros[: int(self.lengths[index])]
        return dict.fromkeys(FEATURES, stub)


def example_lengths(examples: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    lengths = getattr(examples, "lengths", None)
    return np.asarray(lengths if lengths is not None else [len(e["input_ids"]) for e in examples])


def count_batches(examples, **kwargs) -> int:
    """Batches in one epoch of this shard, found by running the packer over lengths only."""
    return packing_report(examples, **kwargs)["batches"]


def packing_report(examples, *, batch_size: int, max_seq_length: int, **kwargs) -> dict:
    """One epoch's batches and token efficiency: real tokens over the slots of the [batch, length] rows.

    `padded_efficiency` is the baseline of padding each batch of (shuffled) examples to its longest.
    """
    lengths = np.minimum(example_lengths(examples), max_seq_length)
    shard = slice(kwargs.get("shard_index", 0), None, kwargs.get("shard_count", 1))
    num_batches = real = 0
    for batch in batches(
        _LengthStubs(lengths), batch_size=batch_size, max_seq_length=max_seq_length, num_epochs=1, **kwargs
    ):
        num_batches += 1
        real += int(np.count_nonzero(batch["segment_ids"]))
    order = np.random.default_rng(kwargs.get("seed", 0)).permutation(lengths[shard])
    longest = [order[i : i + batch_size].max() for i in range(0, len(order), batch_size)]
    return {
        "batches": num_batches,
        "tokens": real,
        "efficiency": real / max(num_batches * batch_size * max_seq_length, 1),
        "padded_efficiency": float(order.sum()) / max(batch_size * sum(longest), 1),
    }
