"""How a run turns encoded examples into steps: the one module that knows what a batch counts.

`train.batch_unit="rows"`: a step is `global_batch_size` packed rows of `max_seq_length` tokens (Grain's
packers stream examples into rows). `"examples"`: a step is exactly `global_batch_size` conversations,
packed into as few rows as they need, the row count rounded up to a bucket that keeps every micro-batch
split evenly over the batch-sharded devices. Training, held-out evaluation and `jsft-plan` all ask a
`Batching` for their batches, steps per epoch and the rows a step compiles for, so they never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jsft import sharding
from jsft.data import pipeline
from jsft.errors import JsftError


@dataclasses.dataclass(frozen=True)
class Batching:
    """The batching rules of one run on one mesh (`batch_shards` = its data x fsdp x expert devices)."""

    global_batch_size: int
    grad_accum_steps: int
    by_examples: bool  # train.batch_unit == "examples"
    max_seq_length: int
    packing: bool
    packer: str
    seed: int
    epochs: int
    max_steps: int  # above 0, overrides epochs
    batch_shards: int = 1
    # This process's group of processes that load the same rows, and how many groups there are: one
    # group per process, unless a context or tensor axis reaches across hosts (`sharding.row_groups`).
    process_index: int = 0
    process_count: int = 1

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, mesh=None) -> Batching:
        """The run's batching over `mesh` (None: no mesh yet, for step counts only) and this process."""
        shards = sharding.batch_shards(mesh) if mesh is not None else 1
        no_mesh = (jax.process_index(), jax.process_count())
        group, groups = sharding.row_groups(mesh) if mesh is not None else no_mesh
        return cls(
            global_batch_size=cfg.train.global_batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            by_examples=cfg.train.batch_unit == "examples",
            max_seq_length=cfg.data.max_seq_length,
            packing=cfg.data.packing,
            packer=cfg.data.packer,
            seed=cfg.train.seed,
            epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps,
            batch_shards=shards,
            process_index=group,
            process_count=groups,
        )

    # --- what a step holds ------------------------------------------------------------------------

    @property
    def unit(self) -> str:
        """What `global_batch_size` counts, in words."""
        return "conversations" if self.by_examples else "rows"

    @property
    def per_process(self) -> int:
        """This process's share of the global batch (rows, or conversations)."""
        return self.global_batch_size // self.process_count

    @property
    def row_multiple(self) -> int:
        """Rows per process that keep every micro-batch split evenly over the data x fsdp x expert devices."""
        shards = self.batch_shards * self.grad_accum_steps
        return math.lcm(shards, self.process_count) // self.process_count

    def check_fits(self) -> None:
        """Every micro-batch splits evenly over the batch-sharded devices, and the batch over processes.

        With examples the row count is chosen per step as a multiple of `row_multiple`, so only the
        split of the conversations over the processes is checked."""
        micro_batch = self.global_batch_size // self.grad_accum_steps
        rows_split = self.by_examples or micro_batch % self.batch_shards == 0
        if not rows_split or self.global_batch_size % self.process_count:
            raise JsftError(
                f"train.global_batch_size={self.global_batch_size} / grad_accum_steps="
                f"{self.grad_accum_steps} must split evenly over data x fsdp x expert = {self.batch_shards} "
                f"devices and {self.process_count} processes"
            )

    def describe(self, rows: int) -> str:
        """A step's batch in words: '128 conversations packed into 130 rows' or '128 rows'."""
        if self.by_examples:
            return f"{self.global_batch_size} conversations packed into {rows} rows"
        return f"{rows} rows"

    # --- batches ----------------------------------------------------------------------------------

    def _shard(self) -> dict:
        return dict(
            max_seq_length=self.max_seq_length,
            seed=self.seed,
            shard_index=self.process_index,
            shard_count=self.process_count,
        )

    def train_batches(self, examples: Sequence[dict[str, np.ndarray]]) -> grain.IterDataset:
        """This process's endless, resumable stream of training batches."""
        if self.by_examples:
            return pipeline.example_batches(
                examples, batch_size=self.per_process, row_multiple=self.row_multiple, **self._shard()
            )
        return pipeline.batches(
            examples, batch_size=self.per_process, packing=self.packing, packer=self.packer, **self._shard()
        )

    def eval_batches(self, examples: Sequence[dict[str, np.ndarray]]) -> grain.IterDataset:
        """One unshuffled pass over this process's held-out examples, in rows (the last batch topped up)."""
        return pipeline.batches(
            examples,
            batch_size=self.per_process,
            packing=self.packing,
            packer=self.packer,
            shuffle=False,
            num_epochs=1,
            **self._shard(),
        )

    # --- steps ------------------------------------------------------------------------------------

    def local_steps_per_epoch(self, examples: Sequence[dict[str, np.ndarray]]) -> int:
        """Full batches in one epoch of this process's shard (the packer run over lengths only)."""
        if self.by_examples:
            shard = len(range(self.process_index, len(examples), self.process_count))
            return shard // self.per_process
        return pipeline.count_batches(
            examples, batch_size=self.per_process, packing=self.packing, packer=self.packer, **self._shard()
        )

    def steps_per_epoch(self, examples: Sequence[dict[str, np.ndarray]]) -> int:
        """Steps in one epoch: the fewest of any process's shard (every process takes a step together)."""
        local = np.asarray(self.local_steps_per_epoch(examples))
        return int(np.min(multihost_utils.process_allgather(local)))

    def total_steps(self, steps_per_epoch: int | None) -> int | None:
        """`train.max_steps` if set, else epochs x `steps_per_epoch` (None while that is unknown)."""
        if self.max_steps > 0:
            return self.max_steps
        return None if steps_per_epoch is None else self.epochs * steps_per_epoch

    def estimated_steps_per_epoch(self, num_examples: int, mean_tokens: float) -> tuple[int, bool]:
        """(steps per epoch, whether it is a lower bound) from a count and a mean length alone."""
        if self.by_examples or not self.packing:
            return num_examples // self.global_batch_size, False
        slots = self.global_batch_size * self.max_seq_length
        return math.ceil(num_examples * min(mean_tokens, self.max_seq_length) / slots), True

    def epoch_packed_rows(self, examples: Sequence[dict[str, np.ndarray]]) -> list[int] | None:
        """With examples: the rows each batch of one epoch packs into before bucketing (lengths only);
        None with rows, where every step has `global_batch_size` rows."""
        if not self.by_examples:
            return None
        return pipeline.example_batch_rows(
            examples, batch_size=self.global_batch_size, max_seq_length=self.max_seq_length, seed=self.seed
        )

    def step_rows(self, packed_rows: list[int] | None = None, mean_tokens: float = 0.0) -> tuple[int, str]:
        """(the rows of the global batch a step compiles for, how they were found).

        Rows: `global_batch_size`. Examples: the largest bucket of one epoch's packed batches
        (`epoch_packed_rows`); else packed at `mean_tokens`; else the worst case, one row each."""
        batch, seq = self.global_batch_size, self.max_seq_length
        if not self.by_examples:
            return batch, ""
        if packed_rows:
            counts = [pipeline.row_bucket(n, self.row_multiple) for n in packed_rows]
            shapes = ", ".join(f"{r} rows x{counts.count(r)}" for r in sorted(set(counts)))
            return max(counts), f"the largest of one epoch's packed batches ({shapes})"
        if mean_tokens:
            needed = math.ceil(batch * min(mean_tokens, seq) / seq)
            return pipeline.row_bucket(
                needed, self.row_multiple
            ), "packed at the mean length (batches of longer ones take more rows)"
        return pipeline.row_bucket(
            batch, self.row_multiple
        ), "the worst case, each conversation in a row of its own"
