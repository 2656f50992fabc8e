"""jsft's lm-evaluation-harness backend against the harness's own `hf` backend (transformers + torch, float32)
on the tiny model and local tasks: every log-likelihood within 1e-4 (multiple choice and rolling), the same
accuracies and the same greedy strings. Skips without the `eval` extra."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_MODEL

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the eval extra)")
pytest.importorskip("torch", reason="the harness's hf backend is the reference")

from lm_eval import evaluator as harness  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jsft import evaluate, inference  # noqa: E402
from jsft import lm_eval as backend  # noqa: E402

WORDS = ("moon", "ab", "tiny", "xyz", "sort", "hello")


def write_tasks(folder) -> list[str]:
    """A choice task, a raw-prompt generate task (stopping at a newline) and a rolling log-likelihood task."""
    choice = [
        {"prompt": f"upper: {w}\nAnswer:", "choices": [w.upper(), w, w[::-1], "Q"], "answer": i % 4}
        for i, w in enumerate(WORDS)
    ]
    generate = [{"prompt": f"reverse: {w} ->", "answer": w[::-1]} for w in WORDS]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate))
    backend.harness_task({"name": "tiny_mc", "path": str(folder / "mc.jsonl"), "kind": "choice"}, str(folder))
    spec = {"name": "tiny_gen", "path": str(folder / "gen.jsonl"), "kind": "generate", "chat": False}
    backend.harness_task(spec | {"max_new_tokens": 12, "stop": ["\n"]}, str(folder))
    rolling = {
        "task": "tiny_rolling",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "gen.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{prompt}} {{answer}}",
        "metric_list": [{"metric": "word_perplexity"}],
    }
    (folder / "rolling.yaml").write_text(json.dumps(rolling))
    return ["tiny_mc", "tiny_gen", "tiny_rolling"]


def test_jsft_backend_agrees_with_the_harness_hf_backend(tmp_path):
    """Also: jsft's own choice scoring (jsft.evaluate, as jsft-eval and log.eval_tasks score) of the same rows
    gives the harness's acc and acc_norm."""
    tasks = write_tasks(tmp_path)
    lm = backend.JsftLM(inference.load(str(TINY_MODEL)), batch_size=8)
    jsft = backend.run(
        lm,
        tasks,
        include_path=str(tmp_path),
        log_samples=True,
    )
    hf = harness.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(TINY_MODEL), "dtype": "float32", "device": "cpu"},
        tasks=tasks,
        batch_size=8,
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    for task in tasks:
        ours = sorted(jsft["samples"][task], key=lambda s: s["doc_id"])
        theirs = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        assert len(ours) == len(theirs) == len(WORDS)
        for a, b in zip(ours, theirs, strict=True):
            if task == "tiny_gen":
                assert a["resps"] == b["resps"], (a["resps"], b["resps"])  # the same greedy strings
                continue
            if task == "tiny_mc":  # [[(loglikelihood, is_greedy)] per choice]
                assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]
            ours_ll = [r[0][0] if task == "tiny_mc" else r[0] for r in a["resps"]]
            theirs_ll = [r[0][0] if task == "tiny_mc" else r[0] for r in b["resps"]]
            # a rolling document sums ~20 tokens' log-probabilities: its bound grows with the total (1e-6)
            np.testing.assert_allclose(ours_ll, theirs_ll, atol=1e-4, rtol=0 if task == "tiny_mc" else 1e-6)
    for task, metric in [
        ("tiny_mc", "acc,none"),
        ("tiny_mc", "acc_norm,none"),
        ("tiny_gen", "exact_match,none"),
    ]:
        assert jsft["results"][task][metric] == hf["results"][task][metric], (task, metric)
    assert jsft["results"]["tiny_rolling"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["tiny_rolling"]["word_perplexity,none"], rel=1e-4
    )
    choice = evaluate.load_tasks([{"name": "tiny_mc", "path": str(tmp_path / "mc.jsonl"), "kind": "choice"}])
    own = lm.evaluator.score(lm.loaded.params, lm.loaded.base, choice)["tiny_mc"]
    assert (own["acc"], own["acc_norm"]) == pytest.approx(
        (hf["results"]["tiny_mc"]["acc,none"], hf["results"]["tiny_mc"]["acc_norm,none"])
    )
    generated = [s["resps"][0][0] for s in jsft["samples"]["tiny_gen"]]
    assert any(generated), generated  # the greedy strings compared are not all empty
