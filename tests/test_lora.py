"""LoRA: factors fold into the kernels exactly, training moves only them, the export holds the merge."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, TINY_DATA, TINY_MODEL

from jsft import checkpoint, config, models, sharding, train
from jsft.lora import LoraSpec


def _layout():
    cfg, hf_config = models.config_from_folder(str(TINY_MODEL))
    return models.Layout(cfg)


def test_merge_is_w_plus_scaled_a_times_b():
    layout = _layout()
    mesh = sharding.single_device_mesh()
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj"))
    base = models.load_params(str(TINY_MODEL), layout, mesh)
    factors = spec.init(0, layout, mesh)
    assert len(factors) == 2 * 3 * layout.cfg.num_layers
    merged = spec.merge(base, factors)
    for name in base:  # B starts at zero: the adapted model starts as the base
        np.testing.assert_array_equal(merged[name], base[name])
    rng = np.random.default_rng(0)
    factors = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in factors.items()}
    merged = spec.merge(base, factors)
    for name in ("layers.1.attn.q_proj", "layers.1.attn.o_proj", "layers.1.mlp.down_proj"):
        w = np.asarray(base[name])
        a, b = factors[f"{name}.lora_a"], factors[f"{name}.lora_b"]
        n_in = a.ndim - 1
        expected = w + 2.0 * (a.reshape(-1, 4) @ b.reshape(4, -1)).reshape(w.shape)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)
        assert a.shape[:n_in] == w.shape[:n_in]
    np.testing.assert_array_equal(merged["layers.1.attn.k_proj"], base["layers.1.attn.k_proj"])


def test_scanned_factors_stack_the_per_layer_factors():
    """With scanned layers each factor gains the layer axis; the merge equals the unrolled one per layer."""
    mesh = sharding.single_device_mesh()
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj"))
    cfg, hf_config = models.config_from_folder(str(TINY_MODEL), scan_layers=True)
    stacked = models.Layout(cfg)
    unrolled = _layout()
    num_layers = cfg.num_layers
    shapes = spec.shapes(stacked)
    assert shapes["layers.attn.o_proj.lora_a"].shape == (num_layers, cfg.num_heads, cfg.head_dim, 4)
    assert shapes["layers.attn.o_proj.lora_b"].shape == (num_layers, 4, cfg.hidden_size)
    rng = np.random.default_rng(0)
    factors = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in shapes.items()}
    merged = spec.merge(models.load_params(str(TINY_MODEL), stacked, mesh), factors)
    per_layer = {
        name.replace("layers.", f"layers.{i}.", 1): value[i]
        for name, value in factors.items()
        for i in range(num_layers)
    }
    expected = spec.merge(models.load_params(str(TINY_MODEL), unrolled, mesh), per_layer)
    for name, value in merged.items():
        if name.startswith("layers."):
            layers = [expected[name.replace("layers.", f"layers.{i}.", 1)] for i in range(num_layers)]
            np.testing.assert_allclose(value, np.stack(layers), rtol=1e-6, atol=1e-6, err_msg=name)


def test_bad_targets_are_a_clear_error():
    cfg = config.default_config().lora
    cfg.rank, cfg.targets = 4, "q_proj,qkv"
    with pytest.raises(ValueError, match=r"lora.targets: unknown \['qkv'\]"):
        LoraSpec.from_config(cfg)


def test_lora_run_trains_factors_and_exports_the_merged_model(tmp_path):
    out = tmp_path / "run"
    cfg = config.load(
        [
            "prog",
            f"--config={ROOT}/configs/tiny.py",
            f"--config.output_dir={out}",
            f"--config.data.mixer=(('{TINY_DATA}/train.jsonl', 1500),)",
            f"--config.data.eval_mixer=(('{TINY_DATA}/held_out.jsonl', 200),)",
            "--config.train.max_steps=30",
            "--config.log.eval_every_steps=0",
            "--config.lora.rank=8",
            "--config.optim.lr=1e-2",
        ]
    )
    summary = train.run(cfg)
    assert summary["eval_loss_end"] < 0.9 * summary["eval_loss_start"]
    mngr = checkpoint.manager(str(out / "checkpoints"), read_only=True)
    stored = checkpoint.read_json_item(mngr, 30, "meta")
    assert stored["config"]["lora"]["rank"] == 8
    assert not any(p.name == "base" for p in (out / "checkpoints" / "30").iterdir())  # only the factors
    export = tmp_path / "hf"
    subprocess.run(
        [
            sys.executable,
            f"{ROOT}/tools/convert_to_hf.py",
            f"--checkpoint_dir={out}/checkpoints",
            f"--output_dir={export}",
        ],
        check=True,
        cwd=ROOT,
    )
    layout, _ = checkpoint.saved_layout(mngr, 30)
    assert layout.cfg.scan_layers  # the default
    mesh = sharding.single_device_mesh()
    spec = LoraSpec.from_config(cfg.lora)
    factors, _, _ = checkpoint.restore_for_export(mngr, 30, spec.shapes(layout), spec.shardings(layout, mesh))
    ids = np.arange(1, 20, dtype=np.int32)[None]
    ours = np.asarray(
        layout.merge(spec.merge(models.load_params(str(TINY_MODEL), layout, mesh), factors))(ids)
    )
    with torch.no_grad():
        exported = (
            transformers.AutoModelForCausalLM.from_pretrained(export).eval()(torch.tensor(ids)).logits.numpy()
        )
        base = (
            transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
            .eval()(torch.tensor(ids))
            .logits.numpy()
        )
    np.testing.assert_allclose(ours, exported, atol=1e-4, rtol=0)
    assert np.abs(exported - base).max() > 1e-2
