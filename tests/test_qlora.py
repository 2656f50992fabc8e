"""QLoRA: the frozen kernels sit on the devices quantized block-wise (int8, or two NF4 codes per byte),
are dequantized one layer at a time inside the layer scan, and the tiny config still learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, tiny_run_args

from jsft import config, models, sharding, train
from jsft.config import default_config
from jsft.lora.quant import NF4_LEVELS, Quantized, quantize
from jsft.lora.spec import LoraSpec
from jsft.trainer import Trainer


def test_int8_blocks_round_to_the_nearest_step():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 3, 8)).astype(np.float32)  # blocks of 32 along the first axis
    q = quantize(jnp.asarray(w), kind="int8", axis=-3, block=32)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and q.scales.shape == (3, 3, 8)
    blocks = w.reshape(3, 32, 3, 8)
    np.testing.assert_allclose(q.scales, np.abs(blocks).max(axis=1) / 127, rtol=1e-6)
    error = np.abs(np.asarray(q.dequantize(jnp.float32)) - w).reshape(3, 32, 3, 8)
    assert (error <= np.asarray(q.scales)[:, None] / 2 + 1e-7).all()


def test_nf4_codes_are_the_nearest_level_packed_two_per_byte():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 64, 6)).astype(np.float32)  # stacked: 4 layers, blocks of 16 along axis 1
    q = quantize(jnp.asarray(w), kind="nf4", axis=-2, block=16)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (4, 32, 6) and q.shape == w.shape
    absmax = np.abs(w.reshape(4, 4, 16, 6)).max(axis=2)
    np.testing.assert_allclose(q.scales, absmax, rtol=1e-6)
    normalized = w / np.repeat(absmax, 16, axis=1)
    nearest = np.abs(normalized[..., None] - NF4_LEVELS).argmin(-1)
    codes = np.asarray(q.codes)
    unpacked = np.stack([codes & 15, codes >> 4], axis=2).reshape(w.shape)  # low nibble first
    np.testing.assert_array_equal(unpacked, nearest)
    np.testing.assert_allclose(
        q.dequantize(jnp.float32), NF4_LEVELS[nearest] * np.repeat(absmax, 16, axis=1), rtol=1e-6
    )
    layer = jax.tree.map(lambda x: x[2], q)  # a scan's slice of a stacked kernel keeps its axis
    np.testing.assert_array_equal(layer.dequantize(jnp.float32), np.asarray(q.dequantize(jnp.float32))[2])


def _trainer(quantization, mesh=None, **lora):
    cfg = default_config()
    cfg.lora.rank, cfg.lora.base_quantization, cfg.lora.base_dtype = 4, quantization, "bfloat16"
    for key, value in lora.items():
        cfg.lora[key] = value
    model_cfg, _ = models.config_from_folder(str(TINY_MODEL), scan_layers=True)
    mesh = mesh or sharding.single_device_mesh()
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=10)
    return trainer, trainer.load_state(str(TINY_MODEL))


@pytest.mark.parametrize("quantization, code_dtype, bits", [("int8", jnp.int8, 8), ("nf4", jnp.uint8, 4)])
def test_the_quantized_base_is_what_sits_on_the_device(quantization, code_dtype, bits):
    trainer, state = _trainer(quantization)
    layout = trainer.layout
    kernels = [n for n in state.base if n.rsplit(".", 1)[-1].endswith("_proj")]
    assert len(kernels) == 7
    for name in kernels:
        q = state.base[name]
        assert isinstance(q, Quantized) and q.codes.dtype == code_dtype, name
        values = int(np.prod(layout.shapes[name].shape))
        assert q.codes.on_device_size_in_bytes() == values * bits // 8, name
        assert q.scales.dtype == jnp.float32 and q.scales.size == values // q.block, name
        # the largest divisor up to 64 of the last input axis: head_dim 32 (o_proj), intermediate 352
        assert q.block == {"o_proj": 32, "down_proj": 44}.get(name.rsplit(".", 1)[-1], 64), name
    for name in set(state.base) - set(kernels):  # embeddings, LM head, norms: the base dtype
        assert state.base[name].dtype == jnp.bfloat16, name
    quantized = sum(x.on_device_size_in_bytes() for n in kernels for x in jax.tree.leaves(state.base[n]))
    full = sum(4 * int(np.prod(layout.shapes[n].shape)) for n in kernels)
    assert quantized < {"int8": 0.27, "nf4": 0.145}[quantization] * full


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_dequantized_inside_the_scan_equals_the_dequantized_base(quantization):
    """The step-0 model over the quantized base is the model over its dequantized kernels, and close to
    the full-precision one."""
    trainer, state = _trainer(quantization, base_dtype="float32")
    layout = trainer.layout
    ids = np.arange(1, 40, dtype=np.int32)[None]
    forward = jax.jit(lambda p: layout.merge(p)(ids))
    ours = np.asarray(forward({**state.base, **state.params}))
    dequantized = {
        n: v.dequantize(jnp.float32) if isinstance(v, Quantized) else v for n, v in state.base.items()
    }
    np.testing.assert_allclose(ours, forward({**dequantized, **state.params}), atol=1e-5, rtol=0)
    full = models.load_params(str(TINY_MODEL), layout, sharding.single_device_mesh())
    error = np.abs(ours - np.asarray(forward({**full, **state.params}))).max()
    assert error < {"int8": 0.05, "nf4": 0.5}[quantization]


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_qlora_trains_the_tiny_config(tmp_path, quantization):
    cfg = config.load(
        [
            "prog",
            *tiny_run_args(tmp_path, 1000, 200),
            "--config.train.max_steps=25",
            "--config.log.eval_every_steps=0",
            "--config.lora.rank=8",
            f"--config.lora.base_quantization={quantization}",
            "--config.optim.lr=1e-2",
        ]
    )
    summary = train.run(cfg)
    assert summary["eval_loss_end"] < 0.9 * summary["eval_loss_start"], summary


def test_quantized_kernels_on_the_fsdp_tensor_mesh():
    """Codes split like their kernel on the 8-device mesh; the step runs there."""
    mesh_cfg = config.default_config().mesh
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, 4, 2
    trainer, state = _trainer("nf4", mesh=sharding.make_mesh(mesh_cfg))
    codes = state.base["layers.mlp.up_proj"].codes  # [layers, embed / 2, mlp]
    assert tuple(codes.sharding.spec) == (None, None, ("fsdp", "tensor"))  # the MLP width, as the kernel
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, (8, 16)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "target_ids": np.roll(ids, -1, 1),
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), ids.shape).copy(),
    }
    state, metrics = trainer.train_step(state, trainer.device_batch(batch))
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["skipped"])


def test_bad_quantization_settings_are_config_errors():
    cfg = default_config()
    cfg.lora.base_quantization = "fp4"
    with pytest.raises(
        config.ConfigError, match="lora.base_quantization: 'fp4' is not one of none, int8, nf4"
    ):
        config._check_choices(cfg, "test")
    spec = LoraSpec(rank=2, alpha=2.0, base_quantization="int8")
    assert spec.scale == 1.0
