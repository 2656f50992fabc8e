"""`train.batch_unit="examples"`: every step holds exactly N conversations, packed, and resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from conftest import TINY_MODEL, tiny_run_args

from jsft import config, data, sharding, train
from jsft.data.batching import Batching
from jsft.data.pipeline import example_batches, row_bucket
from jsft.metrics import batch_fingerprint


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(1, 100, n).astype(np.int32)
        ids[0] = 1000 + i  # tags the example
        out.append({"input_ids": ids, "target_ids": np.roll(ids, -1), "loss_mask": np.ones(n, np.int32)})
    return out


def _segments(batch) -> dict[int, dict[str, np.ndarray]]:
    """Tag -> the example's arrays, read back out of the packed rows; checks positions restart."""
    found = {}
    for row in range(batch["input_ids"].shape[0]):
        for segment in set(batch["segment_ids"][row].tolist()) - {0}:
            where = batch["segment_ids"][row] == segment
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
            tag = int(batch["input_ids"][row][where][0])
            assert tag not in found
            found[tag] = {k: batch[k][row][where] for k in ("input_ids", "target_ids", "loss_mask")}
    return found


def test_each_batch_holds_exactly_n_intact_examples_in_bucketed_rows():
    lengths = np.random.default_rng(1).integers(5, 60, 200)
    examples = _examples(lengths)
    batch_size, length, multiple = 16, 64, 2
    it = iter(
        example_batches(examples, batch_size=batch_size, max_seq_length=length, seed=0, row_multiple=multiple)
    )
    seen, shapes, counts = [], set(), []
    for _ in range(200 // batch_size):  # one epoch
        batch = next(it)
        found = _segments(batch)
        assert len(found) == batch_size
        for tag, arrays in found.items():
            for key, value in arrays.items():
                np.testing.assert_array_equal(value, examples[tag - 1000][key])
        rows = batch["input_ids"].shape[0]
        assert rows % multiple == 0 and rows == row_bucket(rows, multiple)
        assert sum(lengths[t - 1000] for t in found) <= rows * length
        seen += found
        shapes.add(rows)
        counts.append(rows)
    assert len(set(seen)) == len(seen) == (200 // batch_size) * batch_size  # no example twice in an epoch
    assert len(shapes) <= 3
    # What jsft-plan compiles for: the same row counts, from the lengths alone.
    lengths_only = data.example_batch_rows(examples, batch_size=batch_size, max_seq_length=length, seed=0)
    assert [row_bucket(n, multiple) for n in lengths_only] == counts


def test_processes_agree_on_the_row_count_and_share_the_examples():
    lengths = np.random.default_rng(2).integers(5, 120, 300)
    examples = _examples(lengths)
    shards = [
        iter(
            example_batches(examples, batch_size=8, max_seq_length=128, seed=3, shard_index=i, shard_count=2)
        )
        for i in range(2)
    ]
    for _ in range(10):
        a, b = next(shards[0]), next(shards[1])
        assert a["input_ids"].shape == b["input_ids"].shape
        tags_a, tags_b = set(_segments(a)), set(_segments(b))
        assert not tags_a & tags_b
        assert all((t - 1000) % 2 == 0 for t in tags_a) and all((t - 1000) % 2 == 1 for t in tags_b)


def test_the_iterator_resumes_exactly():
    examples = _examples(np.random.default_rng(4).integers(5, 60, 50))
    make = lambda: iter(example_batches(examples, batch_size=8, max_seq_length=64, seed=5))  # noqa: E731
    first = make()
    for _ in range(9):  # past the end of the first epoch
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        for key, value in batch.items():
            np.testing.assert_array_equal(got[key], value)


def _config(out, *extra):
    return config.load(
        [
            "prog",
            *tiny_run_args(out, 400),
            "--config.train.batch_unit=examples",
            "--config.train.global_batch_size=24",
            "--config.train.max_steps=6",
            "--config.checkpoint.every_steps=3",
            "--config.checkpoint.keep=10",
            "--config.log.every_steps=1",
            *extra,
        ]
    )


def _records(out) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


@pytest.mark.parametrize(
    "mesh", [("8", "1", "1"), ("2", "2", "2")], ids=["data8", "data2_fsdp2_tensor2_accum2"]
)
def test_a_run_takes_n_conversations_a_step_and_resumes_exactly(tmp_path, mesh):
    """The run's logged batches are exactly the stream's, 24 conversations each; a resume from step 3
    continues with the same batches and bit-identical losses."""
    data_axis, fsdp, accum = mesh
    extra = [f"--config.mesh.data={data_axis}", f"--config.mesh.fsdp={fsdp}", "--config.mesh.tensor=-1"]
    extra.append(f"--config.train.grad_accum_steps={accum}")
    cfg = _config(tmp_path / "a", *extra)
    train.run(cfg)
    reference = _records(tmp_path / "a")
    assert sorted(reference) == list(range(1, 7))

    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    examples = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed).examples
    stream = iter(Batching.from_config(cfg, sharding.make_mesh(cfg.mesh)).train_batches(examples))
    for step in range(1, 7):
        batch = next(stream)
        assert int(batch["segment_ids"].max(axis=1).sum()) == 24  # segments are numbered 1..k per row
        assert batch["input_ids"].shape[0] % (int(data_axis) * int(fsdp) * int(accum)) == 0
        assert batch_fingerprint(batch) == reference[step]["batch_fingerprint"], step

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    train.run(_config(tmp_path / "b", *extra))
    resumed = _records(tmp_path / "b")
    for step in range(4, 7):
        assert resumed[step]["batch_fingerprint"] == reference[step]["batch_fingerprint"], step
        assert resumed[step]["loss"] == reference[step]["loss"], step
