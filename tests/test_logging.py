"""A short tiny run with samples, scored tasks, TensorBoard and W&B (offline): tensorboard's own event reader
gets back the scalars of metrics.jsonl, the sample text, the config and data statistics; the task scores
equal `python -m jsft.eval` on the saved step; the W&B run directory appears; the progress bar shows
step/total, ETA, loss, lr, tokens/s and MFU."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os

import numpy as np
import pytest
from conftest import ROOT, TINY_DATA, tiny_run_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jsft import config, evaluate, logging_backends, step, train
from jsft.cli import eval as eval_command

PEAK_FLOPS = 1e11  # CPUs have no known peak; with one set, MFU is logged


@pytest.fixture(scope="module")
def run_tasks(tmp_path_factory) -> tuple[dict, dict]:
    """A generate task (4 held-out conversations) and a choice task (3 rows) for `log.eval_tasks`."""
    folder = tmp_path_factory.mktemp("tasks")
    held_out = (TINY_DATA / "held_out.jsonl").read_text().splitlines(keepends=True)[:4]
    (folder / "gen.jsonl").write_text("".join(held_out))
    rows = [{"prompt": f"upper: {w}", "choices": [w.upper(), w], "answer": 0} for w in ("ab", "xyz", "moo")]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (
        {"name": "held", "path": str(folder / "gen.jsonl"), "kind": "generate", "max_new_tokens": 6},
        {"name": "upper_mc", "path": str(folder / "mc.jsonl"), "kind": "choice"},
    )


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, run_tasks):
    out = tmp_path_factory.mktemp("logged")
    cfg = config.load(
        [
            "prog",
            *tiny_run_args(out, 1000, 50),
            "--config.train.max_steps=20",
            "--config.checkpoint.every_steps=20",
            "--config.log.every_steps=5",
            "--config.log.eval_every_steps=10",
            "--config.log.sample_every_steps=10",
            "--config.log.sample_max_new_tokens=8",
            f"--config.log.peak_flops={PEAK_FLOPS}",
            "--config.log.wandb_project=jsft-tests",
            f"--config.log.eval_tasks={run_tasks!r}",
        ]
    )
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    bar = io.StringIO()
    try:
        with contextlib.redirect_stderr(bar):
            train.run(cfg)
    finally:
        os.environ.pop("WANDB_MODE") if previous is None else os.environ.update(WANDB_MODE=previous)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return out, records, events, bar.getvalue()


def test_tensorboard_scalars_equal_metrics_log(logged_run):
    _, records, events, _ = logged_run
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20]
    for key, tag in logging_backends.SCALARS.items():
        lines = [r for r in records if key in r]
        if key in step.ROUTER_METRICS.values():  # a mixture of experts' only; the tiny model is dense
            assert not lines
            continue
        assert lines, key
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in lines]
        np.testing.assert_allclose([s.value for s in scalars], [r[key] for r in lines], rtol=1e-6)  # float32
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in eval_lines] == [0, 10, 20]
    perplexity = [s.value for s in events.Scalars("eval/perplexity")]
    np.testing.assert_allclose(perplexity, [math.exp(r["eval_loss"]) for r in eval_lines], rtol=1e-6)
    assert all(0 < r["mfu"] < 1 for r in train_lines)


def test_task_scores_in_metrics_log_and_tensorboard_equal_jsft_eval_on_the_saved_step(
    logged_run, run_tasks, capsys
):
    """`log.eval_tasks` scores at steps 0, 10 and 20 (as the held-out loss) in metrics.jsonl and
    TensorBoard; `python -m jsft.eval` on the saved step 20 prints the same scores."""
    out, records, events, _ = logged_run
    scored = [r for r in records if "scores" in r]
    assert [r["step"] for r in scored] == [r["step"] for r in records if "eval_loss" in r] == [0, 10, 20]
    assert {t: s["count"] for t, s in scored[-1]["scores"].items()} == {"held": 4, "upper_mc": 3}
    for task, metric in [("held", "exact_match"), ("upper_mc", "acc"), ("upper_mc", "acc_norm")]:
        logged = [(s.step, s.value) for s in events.Scalars(f"scores/{task}/{metric}")]
        assert logged == [(r["step"], pytest.approx(r["scores"][task][metric])) for r in scored]
    capsys.readouterr()
    eval_command.main([f"--model={out}", f"--tasks={json.dumps(run_tasks)}", f"--output={out}/scores.json"])
    after = evaluate.without_records(json.loads((out / "scores.json").read_text()))
    assert after == scored[-1]["scores"]
    printed = capsys.readouterr().out
    assert f"upper_mc     acc_norm     {after['upper_mc']['acc_norm']:.4f}  (n=3)" in printed, printed


def test_samples_in_metrics_log_and_tensorboard_text(logged_run):
    _, records, events, _ = logged_run
    sample_lines = [r for r in records if "samples" in r]
    assert [r["step"] for r in sample_lines] == [0, 10, 20]
    conversations = [
        json.loads(x)["messages"] for x in (TINY_DATA / "held_out.jsonl").read_text().splitlines()
    ]
    for line in sample_lines:
        assert len(line["samples"]) == 3 and line["sample_seconds"] > 0
        for sample in line["samples"]:
            # the prompt is a held-out conversation rendered up to its last assistant turn, the reference
            assert sample["prompt"].startswith("<s>") and sample["prompt"].endswith("<|assistant|>\n")
            assert any(
                f"<|user|>\n{c[-2]['content']}\n<|assistant|>\n" in sample["prompt"]
                and sample["reference"] == c[-1]["content"]
                for c in conversations
            )
    texts = events.Tensors("samples")
    assert [t.step for t in texts] == [0, 10, 20]
    for text, line in zip(texts, sample_lines, strict=True):
        assert text.tensor_proto.string_val[0].decode() == logging_backends.samples_markdown(line["samples"])
    assert sample_lines[0]["samples"] != sample_lines[-1]["samples"]  # the weights changed in between


def test_config_and_data_statistics_logged_once(logged_run):
    out, _, events, _ = logged_run
    (hyperparameters,) = events.Tensors("run/hyperparameters")
    text = hyperparameters.tensor_proto.string_val[0].decode()
    assert (
        "| optim.lr | `0.003` |" in text
        and f"| output_dir | `{out}` |" in text
        and "| total_steps | `20` |" in text
    )
    (stats,) = events.Tensors("run/data")
    text = stats.tensor_proto.string_val[0].decode()
    assert "| train.rows | `1000` |" in text and "| eval.rows | `50` |" in text


def test_wandb_offline_run_directory(logged_run):
    out, _, _, _ = logged_run
    run_id = hashlib.sha1(str(out).encode()).hexdigest()[:16]
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    (run_file,) = run_dir.glob(f"run-{run_id}.wandb")
    assert run_file.stat().st_size > 1000


def test_progress_bar_shows_rates_lr_and_mfu(logged_run):
    _, records, _, bar = logged_run
    last = [line for line in bar.replace("\r", "\n").splitlines() if "step/s" in line or "s/step" in line][-1]
    assert "20/20 [" in last and "<00:00" in last  # step/total, elapsed<remaining
    final = [r for r in records if "loss" in r][-1]
    for shown in (f"loss={final['loss']:.4g}", f"lr={final['lr']:.4g}", "tok_s=", "mfu="):
        assert shown in last


def test_samples_need_prompts():
    with pytest.raises(
        config.ConfigError, match="log.sample_every_steps needs log.sample_prompts or data.eval_mixer"
    ):
        config.load(
            [
                "prog",
                f"--config={ROOT}/configs/tiny.py",
                "--config.data.eval_mixer=()",
                "--config.log.sample_every_steps=10",
            ]
        )
