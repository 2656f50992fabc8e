"""Sources, mixing and Grain packing: every example lands once, intact, in its own segment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from conftest import TINY_MODEL

from jsft import data, errors
from jsft.data import cache, sources


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(1, 100, n + 1).astype(np.int32)
        ids[0] = 1000 + i  # tags the example so it can be found in a packed row
        labels = np.where(rng.random(n + 1) < 0.5, ids, -100).astype(np.int32)
        out.append(cache.shifted(ids, labels != -100))
    return out


def _segments(batch):
    """(first token, inputs, targets, mask, positions) of every packed segment of a batch."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
            out.append({k: batch[k][row, idx] for k in ("input_ids", "target_ids", "loss_mask", "positions")})
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_one_epoch_holds_every_example_once_and_intact(packing):
    examples = _examples(np.random.default_rng(1).integers(2, 30, 57))
    found = {}
    for batch in data.batches(
        examples, batch_size=4, max_seq_length=32, packing=packing, seed=3, num_epochs=1
    ):
        assert batch["input_ids"].shape == (4, 32)
        padding = batch["segment_ids"] == 0
        assert not batch["loss_mask"][padding].any()
        for seg in _segments(batch):
            np.testing.assert_array_equal(seg["positions"], np.arange(len(seg["input_ids"])))
            tag = int(seg["input_ids"][0]) - 1000
            assert tag not in found
            found[tag] = seg
    assert sorted(found) == list(range(len(examples)))
    for tag, seg in found.items():
        for key in ("input_ids", "target_ids", "loss_mask"):
            np.testing.assert_array_equal(seg[key], examples[tag][key])


def test_shift_never_trains_across_examples():
    ids = np.array([5, 6, 7, 8], np.int32)
    labels = np.array([-100, -100, 7, 8], np.int32)
    ex = cache.shifted(ids, labels != -100)
    np.testing.assert_array_equal(ex["input_ids"], [5, 6, 7])
    np.testing.assert_array_equal(ex["target_ids"], [0, 7, 8])
    np.testing.assert_array_equal(ex["loss_mask"], [0, 1, 1])


def test_shards_are_disjoint_and_cover_the_data():
    examples = _examples([5] * 40)
    seen = []
    for shard in range(2):
        for batch in data.batches(
            examples,
            batch_size=2,
            max_seq_length=16,
            packing=True,
            seed=0,
            num_epochs=1,
            shard_index=shard,
            shard_count=2,
        ):
            seen += [int(s["input_ids"][0]) for s in _segments(batch)]
    assert sorted(seen) == [1000 + i for i in range(40)]


def test_mixer_amounts():
    assert len(sources.draw(10, 0.5, 0)) == 5
    up = sources.draw(10, 2.5, 0)
    assert len(up) == 25 and np.bincount(up, minlength=10).min() == 2
    assert len(sources.draw(10, 7, 0)) == 7
    np.testing.assert_array_equal(sources.draw(100, 0.3, 4), sources.draw(100, 0.3, 4))


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_rows_without_messages_are_clear_errors(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    kwargs = dict(tokenizer=tok, max_seq_length=64, chat_template=None, seed=0, max_bad_fraction=0.01)
    no_format = _write_jsonl(tmp_path / "a.jsonl", [{"question": "hello", "answer": "hi"}])
    with pytest.raises(
        errors.DataError, match=r"a.jsonl: expected a known format but found columns question, answer"
    ):
        data.encode_mixture(((no_format, 1.0),), **kwargs)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    one_bad = _write_jsonl(tmp_path / "b.jsonl", [good, {"messages": None}, good])
    with pytest.raises(errors.DataError, match=r"1 of 3 rows are bad.*b.jsonl line 2: empty"):
        data.encode_mixture(((one_bad, 1.0),), **kwargs)
    kwargs["max_bad_fraction"] = 0.5
    encoded = data.encode_mixture(((one_bad, 1.0),), **kwargs)
    assert len(encoded.examples) == 2 and encoded.drops == {"empty": 1}
