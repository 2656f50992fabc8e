"""Row formats mapped by the mixer entry (or detected), and JSON files read with their line numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from conftest import TINY_MODEL

from jsft import config
from jsft.data import encode_mixture, sources
from jsft.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def encode(tok, mixer, **kwargs):
    args = dict(tokenizer=tok, max_seq_length=128, chat_template=None, seed=0, max_bad_fraction=0.0)
    return encode_mixture(mixer, **{**args, **kwargs})


def rows_as_text(tok, encoded) -> list[tuple[str, str]]:
    """(whole row, its trained tokens) decoded, per row."""
    out = []
    for k in range(len(encoded)):
        start, end = encoded.row_starts[k], encoded.row_starts[k + 1]
        ids, trained = encoded.token_ids[start:end], encoded.trained[start:end]
        out.append((tok.decode(ids), tok.decode(ids[trained])))
    return out


def test_each_format_maps_to_the_right_trained_tokens(tmp_path, tok):
    eos = tok.eos_token
    user, assistant = ({"role": r, "content": c} for r, c in (("user", "q1"), ("assistant", "a1")))
    mixer = (
        (write_jsonl(tmp_path / "pc.jsonl", [{"question": "2+2?", "answer": "4"}]), 1.0,
         {"format": "prompt_completion", "prompt": "question", "completion": "answer"}),
        (write_jsonl(tmp_path / "pc_chat.jsonl", [{
            "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                       {"role": "user", "content": "bye"}],
            "completion": [{"role": "assistant", "content": "see you"}],
        }]), 1.0),
        (write_jsonl(tmp_path / "pm.jsonl", [
            {"prompt": "q1", "messages": [user, assistant]},
            {"prompt": "q2", "messages": [{"role": "assistant", "content": "a2"}]},
        ]), 1.0),
        (write_jsonl(tmp_path / "text.jsonl", [{"body": "plain words"}]), 1.0,
         {"format": "text", "text": "body"}),
        (write_jsonl(tmp_path / "sharegpt.jsonl", [
            {"conversations": [{"from": "human", "value": "ping"}, {"from": "gpt", "value": "pong"}]}
        ]), 1.0, "sharegpt"),
        (write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}]),
         1.0),
        (write_jsonl(tmp_path / "chat.jsonl", [
            {"dialog": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ]), 1.0, {"messages": "dialog"}),
    )  # fmt: skip
    encoded = encode(tok, mixer)
    assert [s["format"] for s in encoded.stats["sources"]] == [
        "prompt_completion {'prompt': 'question', 'completion': 'answer'}",
        "prompt_completion",
        "prompt_messages",
        "text {'text': 'body'}",
        "sharegpt",
        "alpaca",
        "messages {'messages': 'dialog'}",
    ]
    rows = rows_as_text(tok, encoded)
    assert rows[0] == (f"<s><|user|>\n2+2?\n<|assistant|>\n4{eos}\n", f"4{eos}\n")
    # the prompt's own assistant turn is context, only the completion trains
    assert rows[1][0].count("<|assistant|>") == 2 and rows[1][1] == f"see you{eos}\n"
    assert rows[2] == (f"<s><|user|>\nq1\n<|assistant|>\na1{eos}\n", f"a1{eos}\n")  # prompt already first
    assert rows[3] == (f"<s><|user|>\nq2\n<|assistant|>\na2{eos}\n", f"a2{eos}\n")  # prompt put first
    # a document trains every token after the first (the shift), and ends with eos
    start, end = encoded.row_starts[4], encoded.row_starts[5]
    assert rows[4][0] == f"plain words{eos}" and encoded.trained[start + 1 : end].all()
    assert rows[5][1] == f"pong{eos}\n"
    assert rows[6] == (f"<s><|user|>\nAdd\n\n1 2\n<|assistant|>\n3{eos}\n", f"3{eos}\n")
    assert rows[7][1] == f"y{eos}\n"
    assert np.array_equal(encoded.row_sources, [0, 1, 2, 2, 3, 4, 5, 6])


def test_detection_and_unknown_shapes_are_one_clear_error(tmp_path, tok):
    detect = sources.detect_format
    assert detect("s", ["prompt", "messages", "prompt_id"], None).name == "prompt_messages"
    assert detect("s", ["messages", "tools"], None).name == "messages"
    assert detect("s", ["prompt", "completion"], None).name == "prompt_completion"
    assert detect("s", ["instruction", "input", "output"], None).name == "alpaca"
    assert detect("s", ["text", "meta"], None).name == "text"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"odd.jsonl: expected a known format but found columns question, answer"
    ):
        encode(tok, ((odd, 1.0),))
    with pytest.raises(
        DataError, match=r"odd.jsonl: expected prompt \+ completion but found columns question"
    ):
        encode(tok, ((odd, 1.0, "prompt_completion"),))
    with pytest.raises(DataError, match=r"unknown format 'chatml'; formats: prompt_messages, messages"):
        config.mixer_entry(("x.jsonl", 1.0, "chatml"))
    with pytest.raises(DataError, match=r"'promt' is not a field of format prompt_completion"):
        config.mixer_entry(("x.jsonl", 1.0, {"format": "prompt_completion", "promt": "q"}))
    cfg = config.default_config()
    cfg.model.path, cfg.data.mixer = "m", (("x.jsonl", 1.0, {"format": "text", "text": 3}),)
    with pytest.raises(config.ConfigError, match=r"data.mixer: .*the column for 'text' must be a string"):
        config.validate(cfg)
    cfg.data.mixer = (("x.jsonl", 1.0, "text"), ("y.jsonl", 2))
    config.validate(cfg)


def test_a_broken_jsonl_line_names_the_file_and_the_line(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n" + '{"messages": [{"role": "user",\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 4: not valid JSON: Expecting"):
        encode(tok, ((str(path), 1.0),))
    path.write_bytes(json.dumps(good).encode() + b"\n" + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2: not UTF-8"):
        encode(tok, ((str(path), 1.0),))


def test_json_rows_keep_their_own_structure(tmp_path):
    """Each row's tool-call arguments stay its own (a columnar reader gives every row all rows' names)."""
    calls = [{"city": "Paris"}, {"a": 1, "b": 2}]
    rows = [
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": c}}]}]}
        for c in calls
    ]
    source = sources.load_source(write_jsonl(tmp_path / "calls.jsonl", rows))
    read = [sources.parse_row(row, where) for batch in source.rows(np.arange(2), 8) for row, where in batch]
    assert [r["messages"][0]["tool_calls"][0]["function"]["arguments"] for r in read] == calls
