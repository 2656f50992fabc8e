"""A short run of the tiny config end to end: loss falls, files appear, the export loads in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, TINY_DATA, TINY_MODEL

from jsft import config, train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = config.load(
        [
            "prog",
            f"--config={ROOT}/configs/tiny.py",
            f"--config.output_dir={out}",
            f"--config.data.mixer=(('{TINY_DATA}/train.jsonl', 2000),)",
            f"--config.data.eval_mixer=(('{TINY_DATA}/held_out.jsonl', 200),)",
            "--config.train.max_steps=40",
            "--config.train.grad_accum_steps=2",
            "--config.checkpoint.every_steps=20",
            "--config.log.eval_every_steps=0",
        ]
    )
    return out, train.run(cfg)


def test_run_lowers_held_out_loss_and_writes_metrics(tiny_run):
    out, summary = tiny_run
    assert summary["eval_loss_end"] < 0.7 * summary["eval_loss_start"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    for r in steps:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_sec"}
        assert np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]


def test_export_loads_in_transformers_with_matching_logits(tiny_run, tmp_path):
    out, _ = tiny_run
    export = tmp_path / "hf"
    subprocess.run(
        [
            sys.executable,
            f"{ROOT}/tools/convert_to_hf.py",
            f"--checkpoint_dir={out}/checkpoints",
            f"--output_dir={export}",
            "--step=20",
        ],
        check=True,
        cwd=ROOT,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template == transformers.AutoTokenizer.from_pretrained(TINY_MODEL).chat_template
    original = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits.numpy()
        start_logits = original(torch.tensor([ids])).logits.numpy()
    from jsft import checkpoint, sharding

    mngr = checkpoint.manager(str(out / "checkpoints"), read_only=True)
    layout, _ = checkpoint.saved_layout(mngr, 20)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    params, _, _ = checkpoint.restore_for_export(mngr, 20, layout.shapes, layout.shardings(mesh))
    ours = np.asarray(layout.merge(params)(np.asarray([ids], np.int32)))
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=0)
    assert np.abs(hf_logits - start_logits).max() > 1e-2  # the export holds the trained weights


def test_missing_model_folder_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jsft.train",
            f"--config={ROOT}/configs/tiny.py",
            f"--config.model.path={tmp_path}/nope",
            f"--config.output_dir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"jsft: error: model folder {tmp_path}/nope does not exist")
