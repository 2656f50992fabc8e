"""The optimizer settings the README promises: schedules and warmup (against transformers' schedulers),
the weight-decay mask, gradient clipping reaching the step, epochs, compute and parameter dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import gradient_recorder

from jsft import models, optim, sharding, train
from jsft.config import default_config
from jsft.data.batching import Batching
from jsft.trainer import Trainer

TOTAL = 40


def _optim_cfg(**values) -> ml_collections.ConfigDict:
    cfg = default_config().optim
    cfg.update(values)
    return cfg


def _transformers_lrs(schedule: str, lr: float, warmup: int, total: int) -> list[float]:
    """The learning rate of each optimizer step under transformers' own scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    else:
        make = getattr(transformers, f"get_{schedule}_schedule_with_warmup")
        sched = make(opt, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [dict(warmup_steps=7), dict(warmup_ratio=0.1), dict(warmup_ratio=0.0)])
def test_schedule_matches_transformers(schedule, warmup):
    cfg = _optim_cfg(lr=3e-4, schedule=schedule, **warmup)
    warmup_steps = optim.warmup_steps(cfg, TOTAL)
    assert warmup_steps == warmup.get("warmup_steps", round(warmup.get("warmup_ratio", 0) * TOTAL))
    ours = [float(optim.make_schedule(cfg, TOTAL)(k)) for k in range(TOTAL)]
    np.testing.assert_allclose(
        ours, _transformers_lrs(schedule, 3e-4, warmup_steps, TOTAL), rtol=1e-5, atol=1e-12
    )


def test_warmup_steps_overrides_warmup_ratio():
    assert optim.warmup_steps(_optim_cfg(warmup_ratio=0.5, warmup_steps=3), TOTAL) == 3
    assert optim.warmup_steps(_optim_cfg(warmup_ratio=0.5, warmup_steps=-1), TOTAL) == 20


@pytest.fixture(scope="module")
def llama_layout(tmp_path_factory):
    from conftest import make_hf_llama

    folder = make_hf_llama(tmp_path_factory.mktemp("optim_llama"), tie_word_embeddings=False)
    model_cfg, _ = models.config_from_folder(str(folder))
    return folder, models.Layout(model_cfg)


def test_weight_decay_skips_norms_biases_and_embeddings(llama_layout):
    """With zero gradients AdamW's step is the decay alone: -lr * wd * p on matrices, nothing elsewhere."""
    _, layout = llama_layout
    params = {k: jnp.full(v.shape, 2.0, v.dtype) for k, v in layout.shapes.items()}
    opt = optim.make_optimizer(_optim_cfg(lr=0.1, weight_decay=0.5, warmup_ratio=0.0, clip_grad_norm=1.0), 10)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    undecayed = {k for k in params if k.endswith(".scale") or "_bias" in k or k == "embed"}
    assert "embed" in undecayed and "final_norm.scale" in undecayed and "lm_head" not in undecayed
    for name, update in updates.items():
        expected = 0.0 if name in undecayed else -0.1 * 0.5 * 2.0
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=name)


def _batch(seed: int = 0, rows: int = 4, seq: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1, 96, (rows, seq)).astype(np.int32),
        "target_ids": rng.integers(1, 96, (rows, seq)).astype(np.int32),
        "loss_mask": (rng.random((rows, seq)) < 0.7).astype(np.int32),
        "segment_ids": np.ones((rows, seq), np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
    }


def _trainer(folder, optimizer=None, dtype="float32", param_dtype="float32", **optim_values):
    model_cfg, _ = models.config_from_folder(str(folder), dtype, param_dtype)
    cfg = default_config()
    cfg.optim.update(dict(dict(lr=1e-3, warmup_ratio=0.0), **optim_values))
    mesh = sharding.single_device_mesh()
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=10, optimizer=optimizer)
    return trainer, trainer.fresh_state(models.load_params(str(folder), trainer.layout, mesh))


def test_clip_grad_norm_from_the_config_scales_the_gradient_adam_sees(llama_layout):
    """Adam's first moment after one step is (1 - b1) x the clipped gradient: g * clip / ||g||."""
    folder, _ = llama_layout
    batch = _batch()
    trainer, state = _trainer(folder, optimizer=gradient_recorder())
    state, _ = trainer.train_step(state, batch)
    grads = jax.device_get(state.opt_state["grads"])
    norm = float(optax.tree.norm(grads))
    clip = norm / 10
    trainer, state = _trainer(folder, clip_grad_norm=clip)
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)  # logged before clipping
    mu = jax.device_get(optax.tree_utils.tree_get(state.opt_state, "mu"))
    for name, g in grads.items():
        np.testing.assert_allclose(mu[name], 0.1 * g * clip / norm, rtol=1e-4, atol=1e-9, err_msg=name)


@pytest.mark.parametrize(
    "dtype, param_dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]
)
def test_training_runs_in_bfloat16_and_keeps_the_parameter_dtype(llama_layout, dtype, param_dtype):
    """`model.dtype` (compute) and `model.param_dtype` (storage) apart: the loss stays within bfloat16
    rounding (2e-2 relative, ~3 bf16 ulps) of float32's, parameters and moments keep their dtype."""
    folder, _ = llama_layout
    batch = _batch(seed=3)
    reference, ref_state = _trainer(folder)
    _, ref_metrics = reference.train_step(ref_state, batch)
    trainer, state = _trainer(folder, dtype=dtype, param_dtype=param_dtype)
    assert trainer.layout.cfg.dtype == jnp.dtype(dtype)
    state, first = trainer.train_step(state, batch)
    assert float(first["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=2e-2)
    state, second = trainer.train_step(state, batch)
    assert not bool(first["skipped"]) and not bool(second["skipped"])
    assert float(second["loss"]) < float(first["loss"])  # it trains
    for name, value in state.params.items():
        assert value.dtype == jnp.dtype(param_dtype), name
    for name, value in optax.tree_utils.tree_get(state.opt_state, "mu").items():
        assert value.dtype == jnp.dtype(param_dtype), name


def test_dtype_auto_is_float32_on_cpu():
    """`model.dtype=auto` is float32 on CPU (bfloat16 on accelerators: the bf16 path is tested above)."""
    from conftest import TINY_MODEL

    cfg = default_config()
    cfg.model.path = str(TINY_MODEL)
    layout, _, _ = train.load_model_description(cfg, cfg.model.path, jax.devices()[0])
    assert jax.default_backend() == "cpu" and layout.cfg.dtype == jnp.float32


@pytest.mark.parametrize("epochs, max_steps, expected", [(1, 0, 3), (3, 0, 9), (3, 5, 5)])
def test_steps_are_epochs_times_batches_unless_max_steps(epochs, max_steps, expected):
    """24 unpacked examples in batches of 8: 3 batches per epoch."""
    cfg = default_config()
    cfg.train.global_batch_size, cfg.train.epochs, cfg.train.max_steps = 8, epochs, max_steps
    cfg.data.packing, cfg.data.max_seq_length = False, 32
    examples = [
        dict.fromkeys(("input_ids", "target_ids", "loss_mask"), np.ones(5 + i, np.int32)) for i in range(24)
    ]
    assert train.count_steps(Batching.from_config(cfg), examples) == expected
