"""LoRA applied unmerged inside the layers: starts as the base exactly, equals the merged kernels, trains only
the factors (frozen base bit-identical, optimizer state the factors' size), options, meshes and resume."""

from __future__ import annotations

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import ROOT, TINY_MODEL, assert_params_close, gradient_recorder, tiny_run_args

from jsft import checkpoint, config, models, sharding, train
from jsft.config import default_config
from jsft.errors import JsftError
from jsft.lora import params as lora_params
from jsft.lora.spec import LoraSpec
from jsft.trainer import Trainer

IDS = np.arange(1, 20, dtype=np.int32)[None]


def _model_cfg(scan_layers=True, **kw):
    cfg, _ = models.config_from_folder(str(TINY_MODEL), scan_layers=scan_layers, **kw)
    return cfg


def _forward(layout, params, ids=IDS):
    return np.asarray(jax.jit(lambda p: layout.merge(p)(ids))(params))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_step0_logits_equal_the_base_model_exactly(scan_layers):
    mesh = sharding.single_device_mesh()
    cfg = _model_cfg(scan_layers)
    spec = LoraSpec(rank=4, alpha=8.0)
    layout = models.Layout(cfg, spec)
    assert len(layout.adapters) == 2 * 7 * (1 if scan_layers else cfg.num_layers)
    base = models.load_params(str(TINY_MODEL), layout, mesh)
    assert not set(base) & layout.adapters  # the folder holds no factors, none are read
    lora_logits = _forward(layout, {**base, **lora_params.init_factors(layout, 0, mesh)})
    plain = models.Layout(cfg)
    np.testing.assert_array_equal(
        lora_logits, _forward(plain, models.load_params(str(TINY_MODEL), plain, mesh))
    )


@pytest.mark.parametrize("scan_layers", [True, False])
def test_unmerged_factors_equal_the_merged_kernels(scan_layers):
    """x W + s (x A) B inside the layer equals x (W + s A B), for every kernel shape (o_proj has two
    input axes), with rsLoRA's scale."""
    mesh = sharding.single_device_mesh()
    cfg = _model_cfg(scan_layers)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"), use_rslora=True)
    assert spec.scale == 4.0
    layout = models.Layout(cfg, spec)
    base = models.load_params(str(TINY_MODEL), layout, mesh)
    rng = np.random.default_rng(0)
    factors = {n: 0.05 * rng.normal(size=layout.shapes[n].shape).astype(np.float32) for n in layout.adapters}
    plain = models.Layout(cfg)
    merged = spec.merge(models.load_params(str(TINY_MODEL), plain, mesh), factors)
    ours, reference = _forward(layout, {**base, **factors}), _forward(plain, merged)
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=0)
    assert np.abs(ours - _forward(plain, models.load_params(str(TINY_MODEL), plain, mesh))).max() > 1e-2


def test_targets_by_names_and_by_regex():
    cfg = default_config().lora
    cfg.rank, cfg.targets = 4, "q_proj,qkv"
    with pytest.raises(JsftError, match=r"lora.targets: unknown \['qkv'\]"):
        LoraSpec.from_config(cfg)
    cfg.targets, cfg.target_regex = "q_proj", r".*\.(q|v)_proj"  # PEFT's target_modules as a string
    spec = LoraSpec.from_config(cfg).resolve(num_layers=4)
    assert spec.targets == ("q_proj", "v_proj")
    layout = models.Layout(_model_cfg(), LoraSpec.from_config(cfg))
    assert layout.adapters == {f"layers.attn.{k}.lora_{f}" for k in ("q_proj", "v_proj") for f in "ab"}
    cfg.target_regex = r"model\.layers\.0\.mlp\..*"
    with pytest.raises(JsftError, match="in some layers only"):
        LoraSpec.from_config(cfg).resolve(num_layers=4)
    cfg.target_regex = r"nothing"
    with pytest.raises(JsftError, match="selects no projection"):
        LoraSpec.from_config(cfg).resolve(num_layers=4)


def _trainer(mesh, optimizer=None, total_steps=10, scan_layers=True, **lora):
    cfg = default_config()
    cfg.optim.lr, cfg.optim.warmup_ratio = 1e-2, 0.0
    cfg.lora.rank = 4
    for key, value in lora.items():
        cfg.lora[key] = value
    trainer = Trainer(
        cfg, models.Layout(_model_cfg(scan_layers)), mesh, total_steps=total_steps, optimizer=optimizer
    )
    return trainer, trainer.load_state(str(TINY_MODEL))


def _batch(rows=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, (rows, seq)).astype(np.int32)
    return {
        "input_ids": ids,
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
    }


def test_only_the_factors_train_and_the_base_stays_bit_identical():
    mesh = sharding.single_device_mesh()
    trainer, state = _trainer(mesh)
    layout = trainer.layout
    assert set(state.params) == layout.adapters and not set(state.base) & layout.adapters
    assert all(v.dtype == jnp.float32 for v in state.base.values())  # CPU: the compute dtype
    base_before = jax.device_get(state.base)
    factor_count = sum(v.size for v in state.params.values())
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * factor_count  # Adam's mu and nu, nothing for the base
    assert factor_count < 0.05 * sum(v.size for v in state.base.values())
    for i in range(3):
        state, metrics = trainer.train_step(state, trainer.device_batch(_batch(seed=i)))
    assert not bool(metrics["skipped"])
    for name, value in jax.device_get(state.base).items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)
    assert np.abs(jax.device_get(state.params["layers.mlp.up_proj.lora_b"])).max() > 0


def test_bf16_base_and_no_gradient_for_frozen_kernels():
    """The frozen base is stored in the compute dtype (bf16 here) and the step's gradient tree holds the
    factors alone."""
    mesh = sharding.single_device_mesh()
    cfg = default_config()
    cfg.lora.rank = 4
    model_cfg = _model_cfg(dtype="bfloat16")
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=4, optimizer=gradient_recorder())
    state = trainer.load_state(str(TINY_MODEL))
    assert {v.dtype for v in state.base.values()} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in state.params.values()} == {jnp.dtype(jnp.float32)}
    state, _ = trainer.train_step(state, trainer.device_batch(_batch()))
    grads = state.opt_state["grads"]
    assert set(grads) == trainer.layout.adapters
    assert np.abs(jax.device_get(grads["layers.attn.q_proj.lora_b"])).max() > 0


def test_dropout_changes_the_gradient_not_the_evaluation():
    mesh = sharding.single_device_mesh()
    grads = {}
    for rate in (0.0, 0.5, 0.5):
        trainer, state = _trainer(mesh, optimizer=gradient_recorder(), dropout=rate)
        batch = trainer.device_batch(_batch())
        evaluated = trainer.eval_step(state.params, state.base, batch)["loss_sum"]
        state, metrics = trainer.train_step(state, batch)
        grads.setdefault(rate, []).append(
            jax.device_get(state.opt_state["grads"]["layers.attn.q_proj.lora_b"])
        )
        np.testing.assert_allclose(metrics["loss"] * metrics["trained_tokens"], evaluated, rtol=1e-6)
    assert np.abs(grads[0.0][0] - grads[0.5][0]).max() > 1e-4  # masks drawn
    np.testing.assert_array_equal(grads[0.5][0], grads[0.5][1])  # from (seed, step): reproducible


def test_also_train_trains_named_base_parameters_in_float32():
    mesh = sharding.single_device_mesh()
    trainer, state = _trainer(mesh, also_train="embed,.*norm.*", base_dtype="bfloat16")
    layout = trainer.layout
    extra = {"embed", "final_norm.scale", "layers.pre_attn_norm.scale", "layers.pre_mlp_norm.scale"}
    assert set(state.params) == layout.adapters | extra
    assert all(state.params[n].dtype == jnp.float32 for n in extra)
    assert not extra & set(state.base) and state.base["lm_head"].dtype == jnp.bfloat16
    before = jax.device_get(state.params["final_norm.scale"])
    state, _ = trainer.train_step(state, trainer.device_batch(_batch()))
    assert np.abs(jax.device_get(state.params["final_norm.scale"]) - before).max() > 0


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sharded_mesh_matches_one_device(quantization):
    """fsdp=4 x tensor=2 over the 8 simulated devices: factors split like their kernels' axes, and three
    steps give the single device's factors (SGD: Adam's first steps are lr * sign(g), which turns float32
    reordering of near-zero gradients into full-size differences)."""
    results = {}
    for mesh in (sharding.single_device_mesh(), sharding.make_mesh(_mesh_cfg(fsdp=4, tensor=2))):
        trainer, state = _trainer(mesh, optimizer=optax.sgd(0.5), base_quantization=quantization)
        for i in range(3):
            state, _ = trainer.train_step(state, trainer.device_batch(_batch(seed=i)))
        results[mesh.size] = jax.device_get(state.params)
        if mesh.size == 8:
            spec = state.params["layers.mlp.up_proj.lora_a"].sharding.spec  # [layers, embed, rank]
            assert tuple(spec)[:2] == (None, "fsdp")
            spec = state.params["layers.mlp.up_proj.lora_b"].sharding.spec  # [layers, rank, mlp]
            assert tuple(spec) == (None, None, ("fsdp", "tensor"))  # as its kernel's MLP width
    assert_params_close(results[8], results[1], rtol=1e-5)


def _mesh_cfg(**sizes):
    cfg = config.default_config().mesh
    cfg.data = 1
    for k, v in sizes.items():
        cfg[k] = v
    return cfg


def _tiny_run_args(out, *extra):
    return [
        "prog",
        *tiny_run_args(out, 1500, 200),
        "--config.log.eval_every_steps=0",
        "--config.lora.rank=8",
        "--config.optim.lr=1e-2",
        *extra,
    ]


def test_lora_run_trains_and_exports_merged_and_peft(tmp_path):
    """A LoRA run of the tiny config: the held-out loss falls, checkpoints hold the factors only, and the
    merged export and the PEFT adapter (loaded by peft on the transformers base) give jsft's logits."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    cfg = config.load(_tiny_run_args(out, "--config.train.max_steps=30"))
    summary = train.run(cfg)
    assert summary["eval_loss_end"] < 0.9 * summary["eval_loss_start"]
    assert not any(p.name == "base" for p in (out / "checkpoints" / "30").iterdir())
    for extra, folder in (([], tmp_path / "hf"), (["--adapter_only"], tmp_path / "adapter")):
        subprocess.run(
            [
                sys.executable,
                f"{ROOT}/tools/convert_to_hf.py",
                f"--checkpoint_dir={out}/checkpoints",
                f"--output_dir={folder}",
                *extra,
            ],
            check=True,
            cwd=ROOT,
        )
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    mngr = checkpoint.manager(str(out / "checkpoints"), read_only=True)
    layout, _ = checkpoint.saved_layout(mngr, 30)
    assert layout.cfg.scan_layers and layout.lora.rank == 8
    mesh = sharding.single_device_mesh()
    names = sorted(layout.trainable)
    factors, _, _ = checkpoint.restore_for_export(
        mngr, 30, {n: layout.shapes[n] for n in names}, {n: layout.shardings(mesh)[n] for n in names}
    )
    ours = _forward(layout, {**models.load_params(str(TINY_MODEL), layout, mesh), **factors})
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        base = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
        base_logits = base(torch.tensor(IDS)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        for model in (merged, adapted):
            np.testing.assert_allclose(ours, model(torch.tensor(IDS)).logits.numpy(), atol=1e-4, rtol=0)
    assert np.abs(ours - base_logits).max() > 1e-2


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Kill after step 3 (here: drop the later checkpoints), resume: the factors and Adam's moments at
    step 6 equal the uninterrupted run's bit for bit; the frozen base is read again from the folder."""
    out = tmp_path / "run"
    args = _tiny_run_args(
        out,
        "--config.train.max_steps=6",
        "--config.checkpoint.every_steps=3",
        "--config.data.eval_mixer=()",
        "--config.lora.dropout=0.1",
        "--config.lora.base_quantization=int8",
    )
    train.run(config.load(args))
    reference = out.parent / "reference"
    shutil.copytree(out / "checkpoints" / "6", reference)
    shutil.rmtree(out / "checkpoints" / "6")
    summary = train.run(config.load(args))
    assert summary["steps"] == 6
    mngr = checkpoint.manager(str(out / "checkpoints"), read_only=True)
    layout, _ = checkpoint.saved_layout(mngr, 6)
    names = sorted(layout.trainable)
    abstract = {n: layout.shapes[n] for n in names}
    shardings = {n: layout.shardings(sharding.single_device_mesh())[n] for n in names}
    resumed, _, _ = checkpoint.restore_for_export(mngr, 6, abstract, shardings)
    shutil.rmtree(out / "checkpoints" / "6")
    shutil.copytree(reference, out / "checkpoints" / "6")
    mngr = checkpoint.manager(str(out / "checkpoints"), read_only=True)
    uninterrupted, _, _ = checkpoint.restore_for_export(mngr, 6, abstract, shardings)
    for name in names:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)
