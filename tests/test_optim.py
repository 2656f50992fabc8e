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

from jsft import config, errors, models, optim, sharding, train
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


def _quadratic_run(optimizer: optax.GradientTransformation, steps: int, shape=(64, 256)):
    """`steps` updates of a matrix pulled to 0 under noisy gradients; (final params, final state)."""
    rng = np.random.default_rng(0)
    params = {"layers.mlp.w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for _ in range(steps):
        noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        grads = {"layers.mlp.w": params["layers.mlp.w"] + noise}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_adamw_is_optax_adamw_step_for_step_with_the_same_state_tree():
    """The chain is built by hand (so its moments can be stored in another dtype); with the parameters'
    dtype it must be optax.adamw exactly, state tree included (checkpoints of either restore in the other)."""
    cfg = _optim_cfg(lr=1e-2, warmup_ratio=0.0, weight_decay=0.1, clip_grad_norm=0.0)
    ours = optim.make_optimizer(cfg, 20)
    reference = optax.adamw(
        optim.make_schedule(cfg, 20),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=0.1,
        mask=lambda p: {name: optim.decays(name) for name in p},
    )
    got, got_state = _quadratic_run(ours, 20)
    expected, expected_state = _quadratic_run(reference, 20)
    assert jax.tree.structure(got_state) == jax.tree.structure(expected_state)
    np.testing.assert_array_equal(got["layers.mlp.w"], expected["layers.mlp.w"])


def test_stochastic_rounding_to_bfloat16_is_unbiased():
    x = jnp.full((200_000,), 1.0 + 3 / 1024, jnp.float32)  # between two bfloat16 values (spacing 1/128)
    rounded = optim._round_stochastically(x, jax.random.key(1), jnp.bfloat16)
    assert set(np.unique(np.asarray(rounded, np.float32))) == {1.0, 1.0 + 1 / 128}
    assert float(jnp.mean(rounded.astype(jnp.float32))) == pytest.approx(1.0 + 3 / 1024, rel=2e-5)


def test_bfloat16_moments_follow_float32_ones_where_rounding_to_nearest_stalls():
    """b2 = 0.999 moves the second moment by 0.1% a step, below bfloat16's spacing (0.4-0.8%): rounded to
    nearest it stays at its first value; rounded stochastically it tracks float32's within 2%."""
    cfg = _optim_cfg(lr=1e-3, warmup_ratio=0.0, clip_grad_norm=0.0, b2=0.999)
    _, f32_state = _quadratic_run(optim.make_optimizer(cfg, 300), 300)
    cfg.moment_dtype = "bfloat16"
    _, bf16_state = _quadratic_run(optim.make_optimizer(cfg, 300), 300)
    nearest = optim.moments_stored_in(jnp.bfloat16, optax.scale_by_adam(b2=0.999))
    nearest_nu = optax.tree_utils.tree_get(_quadratic_run_nearest(nearest), "nu")["layers.mlp.w"]
    f32_nu = np.asarray(optax.tree_utils.tree_get(f32_state, "nu")["layers.mlp.w"])
    bf16_nu = optax.tree_utils.tree_get(bf16_state, "nu")["layers.mlp.w"]
    assert bf16_nu.dtype == jnp.bfloat16
    assert optax.tree_utils.tree_get(bf16_state, "mu")["layers.mlp.w"].dtype == jnp.bfloat16
    relative = np.abs(np.asarray(bf16_nu, np.float32) - f32_nu).mean() / f32_nu.mean()
    assert relative < 0.02, relative
    assert np.abs(np.asarray(nearest_nu, np.float32) - f32_nu).mean() / f32_nu.mean() > 5 * relative


def _quadratic_run_nearest(adam: optax.GradientTransformation) -> optax.OptState:
    """The same run with the second moment rounded to nearest (the stochastic rounding switched off)."""
    original = optim._round_stochastically
    optim._round_stochastically = lambda x, key, dtype: x.astype(dtype)
    try:
        return _quadratic_run(adam, 300)[1]
    finally:
        optim._round_stochastically = original


def test_adafactor_keeps_rows_and_columns_and_trains():
    cfg = _optim_cfg(name="adafactor", lr=1e-2, warmup_ratio=0.0, clip_grad_norm=1.0, weight_decay=0.01)
    before, _ = _quadratic_run(optax.identity(), 0, shape=(128, 256))
    after, state = _quadratic_run(optim.make_optimizer(cfg, 50), 50, shape=(128, 256))
    state_size = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert state_size <= 128 + 256 + 1  # factored: a row and a column statistic (and a placeholder)
    assert float(jnp.abs(after["layers.mlp.w"]).mean()) < 0.5 * float(jnp.abs(before["layers.mlp.w"]).mean())


def test_moment_dtype_is_adamw_only():
    cfg = default_config()
    cfg.model.path, cfg.data.mixer = "m", (("d.jsonl", 1.0),)
    cfg.optim.name, cfg.optim.moment_dtype = "adafactor", "bfloat16"
    with pytest.raises(errors.ConfigError, match="optim.moment_dtype='bfloat16' is AdamW's"):
        config.validate(cfg)


def test_adafactor_state_on_an_fsdp_mesh_shards_full_statistics_and_replicates_factored_ones():
    """Factored statistics (a matrix's row and column) are not shaped like their parameter: they are
    replicated; the unfactored ones (vectors, small matrices) are split like their parameter."""
    from conftest import small_model_config

    from jsft import step

    layout = models.Layout(small_model_config(hidden_size=128, intermediate_size=256, vocab_size=256))
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 8, "tensor": 1}))
    optimizer = optim.make_optimizer(_optim_cfg(name="adafactor"), 10)
    shardings = step.state_shardings(layout, optimizer, mesh)
    state = step.init_state(layout.init(0, mesh), optimizer, shardings)
    shapes = step.trainable_shapes(layout)
    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
        if name in shapes and leaf.ndim:
            like_param = leaf.shape == shapes[name].shape
            expected = shardings.params[name] if like_param else sharding.replicated(mesh)
            assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (path, leaf.shape)
            checked += 1
    assert checked > len(shapes)  # rows and columns of the matrices, full statistics of the rest
