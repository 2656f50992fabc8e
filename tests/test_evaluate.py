"""Scored evaluation (jsft.evaluate): scoring rules on known strings, the task grammar's one-line errors,
log-likelihoods against transformers + torch. The `log.eval_tasks` hook is tested on the run of
test_logging.py, against `python -m jsft.eval` on the step it saved."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_MODEL

from jsft import config, evaluate, inference
from jsft.errors import ConfigError, JsftError

GENERATE = {"score": "exact_match", "ignore_case": False, "answer_regex": ""}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "completion, answer, settings, right",
    [
        ("  JPQC \n", "JPQC", {}, True),  # surrounding whitespace
        ("a  b\tc", "a b c", {}, True),  # inner whitespace runs
        ("jpqc", "JPQC", {}, False),
        ("jpqc", "JPQC", {"ignore_case": True}, True),
        ("JPQCX", "JPQC", {}, False),
        ("The capital of France is Paris.", "Paris", {"score": "contains"}, True),
        ("The capital is Lyon.", "Paris", {"score": "contains"}, False),
        ("so 3 + 4 = 7 and #### 1,234", "#### 1234", {"score": "final_answer"}, True),  # GSM8K's marker
        ("12 apples, then 42.", "42", {"score": "final_answer"}, True),  # else the last number
        ("costs $42.00", "#### 42", {"score": "final_answer"}, True),  # numbers compare by value
        ("12 apples, then 41", "#### 42", {"score": "final_answer"}, False),
        ("no number here", "42", {"score": "final_answer"}, False),
        ("answer: (B) because", "B", {"score": "final_answer", "answer_regex": r"\(([A-D])\)"}, True),
        ("answer: (C)", "(B)", {"score": "final_answer", "answer_regex": r"\(([A-D])\)"}, False),
    ],
)
def test_scoring_rules_on_known_strings(completion, answer, settings, right):
    assert evaluate.is_correct(completion, answer, GENERATE | settings) is right


def test_final_answer_extraction_and_stop_texts():
    assert evaluate.final_answer("x #### $1,000.") == "1000"
    assert evaluate.final_answer("first 3, then -7.5 units") == "-7.5"
    assert evaluate.final_answer("nothing") is None
    assert evaluate.cut_at_stop("JPQC\nQ: next", ["\n", "Q:"]) == "JPQC"


def test_task_grammar_and_rows_fail_in_one_line_naming_file_row_and_key(tmp_path):
    good = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}])
    with pytest.raises(ConfigError, match=r"unknown key 'score' for kind choice"):
        evaluate.load_tasks([{"name": "m", "path": good, "kind": "choice", "score": "exact_match"}])
    with pytest.raises(ConfigError, match=r"kind must be one of generate, choice"):
        evaluate.load_tasks([{"name": "m", "path": good, "kind": "mc"}])
    with pytest.raises(ConfigError, match=r"lacks the key 'path'"):
        evaluate.load_tasks([{"name": "m", "kind": "choice"}])
    with pytest.raises(ConfigError, match=r"max_new_tokens=0|max_new_tokens must be at least 1"):
        evaluate.load_tasks([{"name": "g", "path": good, "kind": "generate", "max_new_tokens": 0}])
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "choices": ["x", "y"], "answer": 0}, {"prompt": "b"}]
    )
    with pytest.raises(JsftError, match=rf'^{bad}:2: key "choices" is missing'):
        evaluate.load_tasks([{"name": "m", "path": bad, "kind": "choice"}])
    index = write_jsonl(tmp_path / "index.jsonl", [{"prompt": "a", "choices": ["x", "y"], "answer": 2}])
    with pytest.raises(JsftError, match=rf'^{index}:1: key "answer" must be the index .* \(0-1\)'):
        evaluate.load_tasks([{"name": "m", "path": index, "kind": "choice"}])
    with pytest.raises(JsftError, match=rf'^{good}:1: key "answer" must be a text, got int'):
        evaluate.load_tasks([{"name": "g", "path": good, "kind": "generate"}])
    with pytest.raises(ConfigError, match=r"log.eval_tasks: two tasks are named 'm'"):
        cfg = config.default_config()
        cfg.model.path, cfg.data.mixer = "m", (("x.jsonl", 1.0),)
        cfg.log.eval_tasks = ({"name": "m", "path": good, "kind": "choice"},) * 2
        config.validate(cfg)


def test_choice_loglikelihoods_equal_transformers(tmp_path):
    """Every choice's log-likelihood on the tiny model equals transformers + torch's in float32 (1e-4),
    with prompts of different lengths in one padded batch, and acc / acc_norm follow from them."""
    torch = pytest.importorskip("torch")
    import transformers

    rows = [
        {"prompt": "upper: moon\nAnswer:", "choices": ["MOON", "moon", "noom", "M"], "answer": 0},
        {"prompt": "count: abcde fgh ijklm nopq rstu", "choices": ["4", "5", "twenty"], "answer": 2},
        {"prompt": "reverse: ab ", "choices": ["ba", "ab"], "answer": 1},  # trailing space moves on
    ]
    task = {"name": "mc", "path": write_jsonl(tmp_path / "mc.jsonl", rows), "kind": "choice"}
    model = inference.load(str(TINY_MODEL))
    evaluator = evaluate.Evaluator.for_model(model, batch_size=4)
    scores = evaluator.score(model.params, model.base, evaluate.load_tasks([task]))["mc"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    accuracy = {"acc": [], "acc_norm": []}
    for row, record in zip(rows, scores["records"], strict=True):
        expected = []
        for choice in row["choices"]:
            context, continuation = evaluate.encode_pair(model.tokenizer, row["prompt"], " " + choice)
            with torch.no_grad():
                logits = reference(torch.tensor([context + continuation])).logits[0]
            logprobs = torch.log_softmax(logits.double(), -1)
            expected.append(sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
        np.testing.assert_allclose(record["loglikelihoods"], expected, atol=1e-4, rtol=0)
        lengths = np.array([len(c) for c in row["choices"]], float)
        accuracy["acc"].append(np.argmax(expected) == row["answer"])
        accuracy["acc_norm"].append(np.argmax(np.array(expected) / lengths) == row["answer"])
    assert scores["count"] == 3
    assert scores["acc"] == np.mean(accuracy["acc"]) and scores["acc_norm"] == np.mean(accuracy["acc_norm"])
