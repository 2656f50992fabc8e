"""A short run of the tiny config end to end: loss falls, files appear, the export loads in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, TINY_MODEL, tiny_run_args

from jsft import config, hf, train
from jsft import export as jsft_export


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = config.load(
        [
            "prog",
            *tiny_run_args(out, 2000, 200),
            "--config.train.max_steps=40",
            "--config.train.grad_accum_steps=2",
            "--config.checkpoint.every_steps=20",
            "--config.log.eval_every_steps=20",
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
    # log.eval_every_steps=20: the held-out loss before the first step and after every 20th, in the log
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert list(evals) == [0, 20, 40]
    assert evals[0] == summary["eval_loss_start"] and evals[40] == summary["eval_loss_end"]
    assert evals[0] > evals[20] > evals[40]


def _convert(out, export, *flags: str) -> None:
    subprocess.run(
        [
            sys.executable,
            f"{ROOT}/tools/convert_to_hf.py",
            f"--checkpoint_dir={out}/checkpoints",
            f"--output_dir={export}",
            "--step=20",
            *flags,
        ],
        check=True,
        cwd=ROOT,
    )


EXPORT_ASSETS = {
    "README.md",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def f32_export(tiny_run, tmp_path_factory):
    """Step 20 exported as trained (float32), in shards of at most 1MB."""
    export = tmp_path_factory.mktemp("hf")
    _convert(tiny_run[0], export, "--max_shard_size=1MB")
    return export


def test_export_loads_in_transformers_with_matching_logits(tiny_run, f32_export):
    """--max_shard_size=1MB gives several shards, none above it; what push_to_hub would upload is
    the folder's files: every shard of the index, the config, tokenizer and card, nothing else."""
    out, _ = tiny_run
    export = f32_export
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 4  # 3.35MB of float32 weights
    hf_tensors = dict(hf.iter_tensors(str(export)))
    for shard in shards:
        assert sum(hf_tensors[n].nbytes for n, f in index["weight_map"].items() if f == shard) <= 2**20
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors.values())
    assert jsft_export.export_files(str(export)) == sorted(
        EXPORT_ASSETS | {"model.safetensors.index.json", *shards}
    )
    assert hf.read_config(str(export))["dtype"] == "float32"

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


def test_export_dtype_flag_writes_bfloat16_weights(tiny_run, f32_export, tmp_path):
    """--dtype=bfloat16: every tensor is the float32 export's rounded to bfloat16; the default shard
    size (5GB) keeps the tiny model in one model.safetensors."""
    _convert(tiny_run[0], tmp_path / "bf16", "--dtype=bfloat16")
    assert hf.read_config(str(tmp_path / "bf16"))["dtype"] == "bfloat16"
    assert jsft_export.export_files(str(tmp_path / "bf16")) == sorted(EXPORT_ASSETS | {"model.safetensors"})
    f32, bf16 = dict(hf.iter_tensors(str(f32_export))), dict(hf.iter_tensors(str(tmp_path / "bf16")))
    assert set(bf16) == set(f32)
    for name, value in f32.items():
        assert bf16[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(bf16[name], value.astype(ml_dtypes.bfloat16), err_msg=name)


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
