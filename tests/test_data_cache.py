"""Mixer counts, the encoded-data cache, parallel encoding, shards and exact resumption."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import pytest
import transformers
from conftest import REALDATA, ROOT, TINY_DATA, TINY_MODEL

from jsft import config, data, errors
from jsft.cli import prepare
from jsft.data import cache, preprocess, sources


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL)


def write_rows(path, n: int, offset: int = 0) -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{offset + i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_cfg(tmp_path, mixer, **overrides) -> ml_collections.ConfigDict:
    cfg = config.default_config().data
    cfg.mixer = mixer
    cfg.max_seq_length = 32
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.num_proc = 1
    cfg.update(overrides)
    return cfg


def test_mixer_gives_the_asked_counts_and_the_same_rows_for_a_seed(tmp_path, caplog):
    a, b = write_rows(tmp_path / "a.jsonl", 40), write_rows(tmp_path / "b.jsonl", 500, offset=1000)
    mixer = ((a, 0.25), (a, 2.5), (a, 7), (a, 90), (b, 1))
    with caplog.at_level(logging.WARNING):
        drawn = sources.mix(mixer, seed=3)
    assert [len(d.indices) for d in drawn] == [10, 100, 7, 90, 1]
    assert (
        np.bincount(drawn[1].indices, minlength=40).min() == 2
    )  # 2.5x: every row twice, half of them thrice
    assert "is a row count; write 1.0 for a fraction" in caplog.text and "b.jsonl" in caplog.text
    assert caplog.text.count("is a row count") == 1  # 7 of 40 rows is not ambiguous
    again = sources.mix(mixer, seed=3)
    for first, second in zip(drawn, again, strict=True):
        np.testing.assert_array_equal(first.indices, second.indices)
    assert not np.array_equal(drawn[0].indices, sources.mix(mixer, seed=4)[0].indices)


def test_prepare_reports_per_source_and_reads_the_cache_the_second_time(tmp_path, tokenizer, monkeypatch):
    a, b = write_rows(tmp_path / "a.jsonl", 30), write_rows(tmp_path / "b.jsonl", 20, offset=100)
    cfg = data_cfg(tmp_path, ((a, 1.0), (b, 10)))
    first = data.prepare(cfg, tokenizer, seed=0)
    assert len(first) == 40 and first.total_rows == 40
    assert [(s["rows_drawn"], s["rows_kept"]) for s in first.stats["sources"]] == [(30, 30), (10, 10)]
    assert first.stats["tokens"] == first.tokens == sum(len(e["input_ids"]) for e in first)
    assert first.stats["trained_tokens"] == sum(int(e["loss_mask"].sum()) for e in first)

    def fail(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(preprocess, "encode_mixture", fail)
    second = data.prepare(cfg, tokenizer, seed=0)
    for x, y in zip(first, second, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    # Anything the rows depend on changes the key.
    key = cache.cache_key
    base = dict(chat_template="", max_seq_length=32, train_on="all_assistant_turns", seed=0)
    reference = key(cfg.mixer, tokenizer, **base)
    assert key(((a, 1.0), (b, 10.0)), tokenizer, **base) != reference  # 10 rows versus 10x
    for change in (
        {"chat_template": "chatml"},
        {"max_seq_length": 33},
        {"train_on": "last_assistant_turn"},
        {"on_unlocated_turn": "train_located"},
        {"seed": 1},
    ):
        assert key(cfg.mixer, tokenizer, **{**base, **change}) != reference
    assert key(((a, 1.0), (b, 10, "messages")), tokenizer, **base) != reference  # a format given
    assert key(((a, 1.0), (b, 10, {"messages": "chat"})), tokenizer, **base) != reference
    write_rows(tmp_path / "b.jsonl", 21, offset=100)
    assert key(cfg.mixer, tokenizer, **base) != reference


def test_an_in_place_edit_with_the_same_size_and_mtime_is_not_served_from_the_cache(tmp_path, tokenizer):
    """The key hashes the files' bytes: one row changed to another of the same length, with the
    modification time put back, was served from the old cache with no warning when sources were keyed
    by (path, size, mtime)."""
    path = tmp_path / "a.jsonl"
    write_rows(path, 30)
    cfg = data_cfg(tmp_path, ((str(path), 1.0),))
    before = data.prepare(cfg, tokenizer, seed=0)
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"q7"', '"q8"', 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = data.prepare(cfg, tokenizer, seed=0)
    assert after.stats["cache_folder"] != before.stats["cache_folder"]
    changed = [
        i for i in range(len(after)) if not np.array_equal(after[i]["input_ids"], before[i]["input_ids"])
    ]
    assert len(changed) == 1
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "a.jsonl").write_text(path.read_text())  # the same bytes at another path: the same key
    assert sources.fingerprint(str(moved / "a.jsonl")) == sources.fingerprint(str(path))


# Runs with HF_HOME and HF_HUB_OFFLINE set as a user sets them (huggingface_hub reads them at import).
HUB_KEY_WORKER = """
import sys, transformers
from jsft import config
from jsft.data import cache, sources
cfg = config.default_config().data
cfg.mixer = (("org/chat", 1.0),)
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print(sources.fingerprint("org/chat"), cache.key_for(cfg, tokenizer, seed=0))
"""


def test_a_hub_data_set_is_keyed_by_the_commit_it_resolves_to(tmp_path):
    """Hub sets were keyed by name only: a new commit of the set was served from the old cache. Offline,
    the commit is the one the local Hub cache's `refs/main` names (laid out by hand, as huggingface_hub
    writes it); when the ref moves, the key moves with it."""
    repo = tmp_path / "hf" / "hub" / "datasets--org--chat"
    (repo / "refs").mkdir(parents=True)
    keys = []
    for commit, rows in (("a" * 40, 3), ("b" * 40, 2)):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        write_rows(snapshot / "train.jsonl", rows)
        (repo / "refs" / "main").write_text(commit)
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [sys.executable, "-c", HUB_KEY_WORKER, str(TINY_MODEL)], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        fingerprint, key = out.stdout.split()
        assert fingerprint == f"hub:org/chat@{commit}"
        keys.append(key)
    assert keys[0] != keys[1]


def test_a_full_disk_while_building_the_cache_is_one_line_and_leaves_no_half_entry(tmp_path):
    """No file may grow past 64 KB, less than one array of the encoded rows: the cache write fails.
    Before, a traceback; now one line naming the disk error, no partial entry a later run could read,
    and no row counted as a drop (the environment's fault is never bad data)."""
    path = write_rows(tmp_path / "a.jsonl", 3000)
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from jsft.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.model.path = {str(TINY_MODEL)!r}\n"
        f"    c.data.mixer = (({path!r}, 1.0),)\n"
        f"    c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
        "    c.data.max_seq_length = 64\n"
        "    return c\n"
    )

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))

    proc = subprocess.run(
        [sys.executable, "-m", "jsft.cli.prepare", f"--config={config_file}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    verdict = lines[-1]  # after the progress lines
    assert verdict.startswith("jsft: error: writing the encoded-data cache ") and "a full disk?" in verdict, (
        lines
    )
    assert not any("Traceback" in line for line in lines)
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list(
        (tmp_path / "cache").rglob("stats.json")
    )


def test_bad_rows_are_counted_by_reason_and_truncation_is_reported(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    long = {"messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "yo"}]}
    long_answer = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y " * 99}]
    }
    rows = [
        good,
        {"messages": []},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        long,
        long_answer,
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded = data.prepare(data_cfg(tmp_path, ((str(path), 1.0),), max_bad_fraction=0.9), tokenizer, seed=0)
    assert encoded.drops == {"empty": 1, "no_assistant": 1, "bad_role": 1, "over_length": 1}
    assert encoded.stats["repairs"] == {"truncated": 1} and len(encoded) == 2
    assert max(len(e["input_ids"]) for e in encoded) == 32
    with pytest.raises(errors.DataError, match=r"4 of 6 rows are bad.*bad.jsonl line 2: empty"):
        data.prepare(data_cfg(tmp_path, ((str(path), 1.0),), max_bad_fraction=0.5), tokenizer, seed=0)


def test_parallel_encoding_matches_serial(tmp_path, tokenizer):
    mixer = ((str(TINY_DATA / "train.jsonl"), 2100),)
    serial = preprocess.encode_mixture(mixer, tokenizer, 64, None, 0, 0.0, num_proc=1)
    parallel = preprocess.encode_mixture(mixer, tokenizer, 64, None, 0, 0.0, num_proc=2)
    for name in ("token_ids", "trained", "row_starts"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tokenizer):
    # 64 tokens: the tiny tokenizer spells words letter by letter, so a system prompt and a first turn
    # take up to ~55 tokens (32 left a fifth of the rows without a trained token)
    cfg = data_cfg(
        tmp_path_factory.mktemp("enc"), ((str(TINY_DATA / "held_out.jsonl"), 1.0),), max_seq_length=64
    )
    return data.prepare(cfg, tokenizer, seed=0)


@pytest.mark.parametrize("packer", ["first_fit", "best_fit"])
def test_shards_are_disjoint_and_cover_the_epoch(encoded, packer):
    seen = []
    for shard in range(2):
        for batch in data.batches(
            encoded, batch_size=4, max_seq_length=128, packing=True, seed=1, num_epochs=1,
            shard_index=shard, shard_count=2, packer=packer,
        ):  # fmt: skip
            assert batch["input_ids"].shape == (4, 128)
            for row in range(4):
                segments = batch["segment_ids"][row]
                for s in np.unique(segments[segments > 0]):
                    tokens = batch["input_ids"][row][segments == s]
                    np.testing.assert_array_equal(
                        batch["positions"][row][segments == s], np.arange(len(tokens))
                    )
                    seen.append(tokens.tobytes())
    assert sorted(seen) == sorted(e["input_ids"].tobytes() for e in encoded)


@pytest.mark.parametrize("packer", ["first_fit", "best_fit"])
def test_restoring_the_iterator_state_continues_with_exactly_the_next_batch(encoded, packer):
    args = dict(batch_size=8, max_seq_length=128, packing=True, seed=5, packer=packer)
    uninterrupted = iter(data.batches(encoded, **args))
    expected = [next(uninterrupted) for _ in range(90)]  # about three epochs: reshuffled each one
    interrupted = iter(data.batches(encoded, **args))
    for _ in range(37):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))  # what a checkpoint stores
    resumed = iter(data.batches(encoded, **args))
    resumed.set_state(state)
    assert isinstance(resumed, grain.DatasetIterator)
    for want in expected[37:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_packing_beats_padding_each_batch_to_its_longest(encoded):
    report = data.packing_report(encoded, batch_size=8, max_seq_length=128, packing=True, seed=0)
    assert report["tokens"] == encoded.tokens
    assert report["efficiency"] > report["padded_efficiency"]
    assert report["batches"] == data.count_batches(
        encoded, batch_size=8, max_seq_length=128, packing=True, seed=0
    )


@pytest.mark.skipif(not (REALDATA / "datasets").is_dir(), reason="../shared/realdata absent")
def test_sharegpt_and_alpaca_files_are_read_as_conversations(tmp_path, tokenizer):
    mixer = (
        (str(REALDATA / "datasets" / "fastchat" / "dummy_conversation.json"), 0.2),
        (str(REALDATA / "datasets" / "llama-factory" / "alpaca_en_demo.json"), 50),
    )
    # 1024: the tiny tokenizer spells words letter by letter; one Alpaca prompt is over 512 of its tokens
    encoded = data.prepare(data_cfg(tmp_path, mixer, max_seq_length=1024), tokenizer, seed=0)
    assert [s["rows_kept"] for s in encoded.stats["sources"]] == [100, 50]


def test_prepare_command_prints_statistics(tmp_path, capsys):
    path = write_rows(tmp_path / "a.jsonl", 30)
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from jsft.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.model.path = {str(TINY_MODEL)!r}\n"
        f"    c.data.mixer = (({path!r}, 1.0),)\n"
        f"    c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
        "    c.data.max_seq_length = 64\n"
        "    return c\n"
    )
    prepare.main([f"--config={config_file}"])
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["rows"] == 30 and report["train"]["drops"] == {}
    assert set(report["train"]["length_percentiles"]) == {"p50", "p90", "p99", "p100"}
    assert 0 < report["train"]["packing"]["efficiency"] <= 1


def test_prepare_show_prints_examples_with_trained_tokens_and_per_source_statistics(tmp_path, capsys):
    chat = write_rows(tmp_path / "a.jsonl", 30)
    bad = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with open(chat, "a") as f:
        f.write(json.dumps(bad) + "\n")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from jsft.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.model.path = {str(TINY_MODEL)!r}\n"
        f"    c.data.mixer = (({chat!r}, 1.0), ({str(docs)!r}, 1.0, 'text'))\n"
        f"    c.data.cache_dir = {str(tmp_path / 'cache')!r}\n"
        "    c.data.max_seq_length = 64\n"
        "    c.data.max_bad_fraction = 0.1\n"
        "    return c\n"
    )
    prepare.main([f"--config={config_file}", "--show=3"])
    out = capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    eos = tok.eos_token
    first = [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    tokens = len(tok.apply_chat_template(first, tokenize=True, return_dict=True)["input_ids"])
    trained = len(tok.encode("a0" + eos + "\n", add_special_tokens=False))
    examples = out.split("--- example ")[1:]
    assert len(examples) == 3 and "\x1b[" not in out  # not a terminal: brackets, no colour
    assert examples[0].startswith(f"1: row 0 of {chat} (messages), {tokens} tokens, {trained} trained ---\n")
    assert f"<s><|user|>\nq0\n<|assistant|>\n[[a0{eos}\n]]" in examples[0]
    assert examples[1].startswith(f"2: row 30 of {docs} (text), ") and f"[[document 0{eos}]]" in examples[1]
    assert f"[[a1{eos}\n]]" in examples[2]
    cached = data.prepare(
        data_cfg(tmp_path, ((chat, 1.0), (str(docs), 1.0, "text")), max_seq_length=64, max_bad_fraction=0.1),
        tok,
        seed=0,
    )
    chat_stats, doc_stats = cached.stats["sources"]
    assert chat_stats["drops"] == {"bad_role": 1} and doc_stats["drops"] == {}
    assert (
        "rows: 31 drawn of 31, 30 kept, 0 truncated\n    dropped: bad_role 1; turns not trained: none" in out
    )
    share = chat_stats["trained_tokens"] / chat_stats["tokens"]
    assert f"trained tokens: {chat_stats['trained_tokens']} of {chat_stats['tokens']} ({share:.1%})" in out
    assert doc_stats["trained_tokens"] == doc_stats["tokens"] and "(100.0%)" in out
    p = chat_stats["length_percentiles"]
    assert f"length percentiles: p50 {p['p50']} p90 {p['p90']} p99 {p['p99']} p100 {p['p100']}" in out
