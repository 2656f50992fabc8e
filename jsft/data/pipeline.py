"""From conversations to packed, sharded training batches.

The examples arrive already shifted (`cache.shifted`: `input_ids`, `target_ids`, `loss_mask`).
Grain shuffles per epoch, packs examples into rows of `max_seq_length` with per-example
`segment_ids` (0 = padding) and `positions`, and batches the rows. Each process reads its own share.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from jsft import config
from jsft.errors import JsftError

FEATURES = ("input_ids", "target_ids", "loss_mask")
# Examples are slices of arrays in memory: reading them inline beats Grain's prefetch threads, whose
# polling costs about 0.5 ms per example.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
PACKER_CLASSES = dict(
    zip(
        config.PACKERS,
        (grain.experimental.FirstFitPackIterDataset, grain.experimental.BestFitPackIterDataset),
        strict=True,
    )
)


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
    if packer not in PACKER_CLASSES:
        raise JsftError(f"data.packer must be one of {', '.join(config.PACKERS)}, got {packer!r}")
    ds = grain.MapDataset.source(examples)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if packing:
        rows = PACKER_CLASSES[packer](
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


def example_batches(
    examples: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    max_seq_length: int,
    seed: int,
    row_multiple: int = 1,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Batches of exactly `batch_size` examples each (`train.batch_unit="examples"`), packed into rows.

    The published recipes count a step in conversations; packing them keeps padding low. A step's
    examples are packed first-fit-decreasing into rows of `max_seq_length` (Grain's packers stream
    rows across batch boundaries, so they cannot pack a fixed group), and the row count is rounded up
    to a bucket (`row_multiple` x 1, 2, 3, 4, 6, 8, 12, ...) so that only a few shapes compile. Every
    process packs the groups of all processes from their lengths and takes the largest row count, so
    the global batch has one shape without any communication. The data repeats forever, reshuffled
    per epoch; a batch is a pure function of its index, so the Grain iterator resumes exactly.
    """

    def groups(source, shard: int) -> grain.MapDataset:
        ds = grain.MapDataset.source(source)[shard::shard_count]
        return ds.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True, batch_fn=list)

    lengths = example_lengths(examples)
    all_shards = [groups(lengths, p) for p in range(shard_count)]  # the same order, lengths only

    def pack(index: int, group: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        needed = max(len(_first_fit_decreasing(shard[index], max_seq_length)) for shard in all_shards)
        return _pack_rows(group, row_bucket(needed, row_multiple), max_seq_length)

    return groups(examples, shard_index).map_with_index(pack).to_iter_dataset(READ_OPTIONS)


def example_batch_rows(
    examples: Sequence[dict[str, np.ndarray]], *, batch_size: int, max_seq_length: int, seed: int
) -> list[int]:
    """The rows each batch of one epoch of `example_batches` on one process packs into, before
    `row_bucket` rounds them up (from lengths only): what jsft-plan compiles for."""
    lengths = grain.MapDataset.source(example_lengths(examples)).shuffle(seed=seed)
    groups = lengths.batch(batch_size, drop_remainder=True, batch_fn=list)
    return [len(_first_fit_decreasing(group, max_seq_length)) for group in groups]


def row_bucket(rows: int, row_multiple: int) -> int:
    """The smallest of row_multiple x (1, 2, 3, 4, 6, 8, 12, 16, ...) that holds `rows` rows."""
    units = -(-rows // row_multiple)
    bucket = 1
    while bucket < units:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 and bucket >= 2 else 2 ** bucket.bit_length()
    return bucket * row_multiple


def _first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Example indices per row: the longest first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        n = int(lengths[i])
        fit = next((r for r, free in enumerate(room) if free >= n), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= n
    return rows


def _pack_rows(group: list[dict[str, np.ndarray]], num_rows: int, length: int) -> dict[str, np.ndarray]:
    lengths = [len(e["input_ids"]) for e in group]
    out = {k: np.zeros((num_rows, length), np.int32) for k in (*FEATURES, "segment_ids", "positions")}
    for row, members in enumerate(_first_fit_decreasing(lengths, length)):
        start = 0
        for segment, i in enumerate(members, start=1):
            n = lengths[i]
            for key in FEATURES:
                out[key][row, start : start + n] = group[i][key]
            out["segment_ids"][row, start : start + n] = segment
            out["positions"][row, start : start + n] = np.arange(n)
            start += n
    return out


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
