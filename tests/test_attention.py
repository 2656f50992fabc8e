"""Attention backends, rematerialisation and activation sharding against the plain XLA model (CPU).

Every backend must equal `dot_product_attention` on packed rows (a leak across segments is silent
otherwise): the cuDNN path through its `implementation="xla"` twin, splash in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model_config
from flax import nnx

from jsft import config, models, sharding
from jsft.errors import ModelOptionError
from jsft.models import attention
from jsft.models.config import ModelConfig, RopeScaling

SCALE = 0.3
CPU = jax.devices()[0]
NVIDIA = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
TPU = types.SimpleNamespace(platform="tpu", device_kind="TPU v5p")
SMALL = small_model_config()


def _packed_segments(rows: int, seq: int, seed: int) -> np.ndarray:
    """Rows of several segments of random lengths (crossing block boundaries), then padding (0)."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((rows, seq), np.int32)
    for row in range(rows):
        start, segment = 0, 1
        while start < seq - seq // 8:
            length = int(rng.integers(1, seq // 2))
            segments[row, start : start + length] = segment
            start, segment = start + length, segment + 1
    return segments


def _qkv(rows: int, seq: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(rows, seq, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(rows, seq, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(rows, seq, kv_heads, head_dim)), jnp.float32)
    return q, k, v, jnp.asarray(_packed_segments(rows, seq, seed))


def _assert_same_value_and_grads(backend, reference, args, atol: float) -> None:
    def weighted_sum(fn):  # a loss whose gradient reaches every output element differently
        weights = jnp.asarray(np.random.default_rng(1).normal(size=args[0].shape), jnp.float32)
        return lambda q, k, v: jnp.sum(fn(q, k, v, args[3]) * weights)

    np.testing.assert_allclose(backend(*args), reference(*args), atol=atol, rtol=0)
    got = jax.grad(weighted_sum(backend), argnums=(0, 1, 2))(*args[:3])
    expected = jax.grad(weighted_sum(reference), argnums=(0, 1, 2))(*args[:3])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=atol * 10, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_cudnn_path_equals_reference(sliding_window):
    """`masked_attention` differs from what runs on GPUs only in implementation="xla"."""
    args = _qkv(rows=3, seq=40)

    def backend(q, k, v, seg):
        return attention.masked_attention(
            q, k, v, seg, scale=SCALE, sliding_window=sliding_window, implementation="xla"
        )

    def reference(q, k, v, seg):
        return attention.dot_product_attention(q, k, v, seg, scale=SCALE, sliding_window=sliding_window)

    _assert_same_value_and_grads(backend, reference, args, atol=1e-5)


@pytest.mark.parametrize(
    "seq, block, sliding_window, softcap",
    [(40, 16, None, None), (45, 8, 5, None), (37, 16, None, 2.0), (20, 256, 7, None)],
    ids=["causal", "sliding", "softcap", "one_block"],
)
def test_blocked_xla_attention_equals_reference(seq, block, sliding_window, softcap):
    """The "xla" backend's query blocks (last one partial) see exactly the keys the full mask allows."""
    args = _qkv(rows=3, seq=seq, seed=seq)
    options = dict(scale=SCALE, logit_softcap=softcap, sliding_window=sliding_window)

    def backend(q, k, v, seg):
        return attention.blocked_attention(q, k, v, seg, block=block, **options)

    def reference(q, k, v, seg):
        return attention.dot_product_attention(q, k, v, seg, **options)

    _assert_same_value_and_grads(backend, reference, args, atol=1e-5)


@pytest.mark.parametrize(
    "seq, sliding_window, softcap",
    [(128, None, None), (256, 40, None), (256, None, 2.0)],
    ids=["causal", "sliding", "softcap"],
)
def test_splash_equals_reference_in_interpret_mode(seq, sliding_window, softcap):
    args = _qkv(rows=2, seq=seq, seed=seq)
    options = dict(scale=SCALE, logit_softcap=softcap, sliding_window=sliding_window)

    def backend(q, k, v, seg):
        return attention.splash_attention(q, k, v, seg, block_size=128, interpret=True, **options)

    def reference(q, k, v, seg):
        return attention.dot_product_attention(q, k, v, seg, **options)

    _assert_same_value_and_grads(backend, reference, args, atol=1e-5)


def test_splash_under_a_mesh_runs_per_shard():
    """Rows split over fsdp, heads over tensor through shard_map: the same numbers."""
    args = _qkv(rows=4, seq=128, seed=3)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})

    def run(q, k, v, seg):
        return attention.splash_attention(q, k, v, seg, scale=SCALE, block_size=128, interpret=True)

    with jax.set_mesh(mesh):
        sharded = jax.jit(run)(*args)
        hlo = jax.jit(run).lower(*args).as_text()
    assert "shard_map" in hlo or "manual" in hlo.lower()
    expected = attention.dot_product_attention(*args, scale=SCALE)
    np.testing.assert_allclose(sharded, expected, atol=1e-5, rtol=0)


def test_splash_rejects_rows_that_blocks_do_not_divide():
    assert attention.splash_block_size(4096) == 512
    assert attention.splash_block_size(256) == 256
    with pytest.raises(ModelOptionError, match="multiple of its block size 512"):
        attention.splash_block_size(1000)


def test_auto_resolves_by_device_and_dtype(caplog):
    bf16 = dataclasses.replace(SMALL, dtype=jnp.bfloat16)
    assert attention.resolve_attention_impl(SMALL) == "xla"  # this CPU
    assert attention.resolve_attention_impl(bf16, NVIDIA) == "cudnn"
    assert attention.resolve_attention_impl(SMALL, TPU) == "splash"
    with caplog.at_level(logging.WARNING):
        assert attention.resolve_attention_impl(SMALL, NVIDIA) == "xla"
        capped = dataclasses.replace(bf16, attn_logit_softcap=50.0)
        assert attention.resolve_attention_impl(capped, NVIDIA) == "xla"
    assert "compute dtype float32" in caplog.text and "soft-capping" in caplog.text


def test_layout_resolves_attention_for_the_device_it_is_given():
    """A TPU program compiled on this CPU host (jsft.planning) gets splash, not this host's xla."""
    on_tpu, here = models.Layout(SMALL, device=TPU), models.Layout(SMALL)
    assert (on_tpu.attention, here.attention) == ("splash", "xla")
    built = on_tpu.merge(on_tpu.shapes)
    backends = {getattr(node, "implementation", None) for _, node in nnx.graph.iter_graph(built)}
    assert backends == {None, "splash"}


def test_impossible_choices_are_clear_errors(hf_llama):
    with pytest.raises(ModelOptionError, match="model.attention='flash' is not one of auto, xla, cudnn"):
        models.config_from_folder(str(hf_llama), attention="flash")
    with pytest.raises(ModelOptionError, match="model.remat='some' is not one of none, full"):
        models.config_from_folder(str(hf_llama), remat="some")
    bf16 = dataclasses.replace(SMALL, dtype=jnp.bfloat16, attention_impl="cudnn")
    with pytest.raises(ModelOptionError, match="cudnn needs an NVIDIA GPU; this is a cpu device"):
        attention.resolve_attention_impl(bf16, CPU)
    with pytest.raises(ModelOptionError, match="soft-capping.*use auto or xla"):
        attention.resolve_attention_impl(dataclasses.replace(bf16, attn_logit_softcap=50.0), NVIDIA)
    with pytest.raises(ModelOptionError, match="head_dim 12"):
        attention.resolve_attention_impl(dataclasses.replace(bf16, head_dim=12), NVIDIA)
    with pytest.raises(ModelOptionError, match="splash needs a TPU; this is a cpu device"):
        models.Layout(dataclasses.replace(SMALL, attention_impl="splash"))


def _loss_and_params(cfg: ModelConfig, rows: int, seq: int):
    """(loss of params, params) for `cfg` on one device: a weighted sum of the final hidden states."""
    layout = models.Layout(cfg)
    params = layout.init(0, sharding.single_device_mesh())
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, seq)), jnp.int32)
    segments = jnp.asarray(_packed_segments(rows, seq, 0))
    positions = jnp.asarray(np.tile(np.arange(seq, dtype=np.int32), (rows, 1)))
    weights = jnp.asarray(rng.normal(size=(rows, seq, cfg.hidden_size)), jnp.float32)

    def loss(p):
        return jnp.sum(layout.merge(p).hidden_states(ids, positions, segments) * weights)

    return loss, params


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize(
    "remat", ["full", "dots_saveable", "minimal", "custom:save=q_proj,k_proj,v_proj,attention_out,up_proj"]
)
def test_remat_keeps_the_gradients(remat, scan_layers):
    cfg = dataclasses.replace(SMALL, num_layers=2, scan_layers=scan_layers)
    loss, params = _loss_and_params(cfg, rows=2, seq=24)
    expected = jax.jit(jax.grad(loss))(params)
    remat_loss, _ = _loss_and_params(dataclasses.replace(cfg, remat=remat), rows=2, seq=24)
    got = jax.jit(jax.grad(remat_loss))(params)
    for name, value in expected.items():
        assert np.linalg.norm(got[name] - value) <= 1e-6 * np.linalg.norm(value), name


def _stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled parameters ("layers.3.attn.q_proj") in the scanned layout ("layers.attn.q_proj" [L, ...])."""
    out = {name: value for name, value in params.items() if not name.startswith("layers.")}
    for name in params:
        if name.startswith("layers.0."):
            rest = name.removeprefix("layers.0.")
            out[f"layers.{rest}"] = jnp.stack([params[f"layers.{i}.{rest}"] for i in range(num_layers)])
    return out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_match_unrolled_layers(remat):
    """Scanned layers of three attention kinds (global with scaled RoPE, sliding with its own RoPE base,
    switched per layer) give the unrolled model's loss and gradients."""
    cfg = dataclasses.replace(
        SMALL,
        num_layers=5,
        sliding_window=7,
        local_rope_theta=100.0,
        rope_scaling=RopeScaling("linear", 4.0),
        layer_types=(
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ),
        remat=remat,
    )
    assert len(cfg.attention_kinds) == 2 and cfg.layer_kind_ids == (0, 1, 0, 0, 1)
    loss, unrolled = _loss_and_params(cfg, rows=2, seq=40)
    scanned_loss, _ = _loss_and_params(dataclasses.replace(cfg, scan_layers=True), rows=2, seq=40)
    expected_value, expected = jax.jit(jax.value_and_grad(loss))(unrolled)
    value, got = jax.jit(jax.value_and_grad(scanned_loss))(_stack_layers(unrolled, cfg.num_layers))
    # float32 reordering alone (scan vs unrolled fusions) moves the loss by up to 1.2e-6 (AVX-512)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for name, g in _stack_layers(expected, cfg.num_layers).items():
        assert np.linalg.norm(got[name] - g) <= 1e-6 * np.linalg.norm(g), name


def gradient_temp_bytes(remat: str, scan_layers: bool) -> int:
    """XLA's temporary memory for the gradient of a 6-layer model on 2 rows of 512 tokens."""
    cfg = dataclasses.replace(SMALL, num_layers=6, remat=remat, scan_layers=scan_layers)
    loss, params = _loss_and_params(cfg, rows=2, seq=512)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_full_remat_needs_less_memory(scan_layers):
    """Measured in a child process: XLA:CPU's default scheduler favours parallelism over memory and
    runs every recomputation early, which hides what remat saves; the memory-minimising one shows it.
    A per-tensor policy lies between: saving nothing by name is full remat's memory, saving every named
    activation needs more, and still less than no remat (the attention scores and activations between
    the named tensors are recomputed)."""
    policies = ("none", "full", "custom:save=", f"custom:save={','.join(config.REMAT_NAMES)}")
    script = (
        f"import json, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
        "from test_attention import gradient_temp_bytes; "
        f"print(json.dumps({{r: gradient_temp_bytes(r, {scan_layers}) for r in {policies!r}}}))"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    temp_bytes = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"temp bytes of the gradient, 6 layers, 2 x 512 tokens: {temp_bytes}")
    assert temp_bytes["full"] < 0.5 * temp_bytes["none"]
    saved_none, saved_all = temp_bytes[policies[2]], temp_bytes[policies[3]]
    assert saved_none == pytest.approx(temp_bytes["full"], rel=0.05)
    assert temp_bytes["full"] < saved_all < temp_bytes["none"]


def test_no_sharding_constraints_without_a_mesh():
    loss, params = _loss_and_params(dataclasses.replace(SMALL, num_layers=1), rows=2, seq=8)
    assert "sharding_constraint" not in str(jax.make_jaxpr(loss)(params))


@pytest.mark.parametrize(
    "mesh_context, scan_layers",
    [("set_mesh", False), ("abstract_mesh_inside_jit", False), ("abstract_mesh_inside_jit", True)],
)
def test_activation_sharding_keeps_the_gradients(mesh_context, scan_layers):
    """On fsdp=4 x tensor=2 with activations pinned (and remat on), the same loss and gradients."""
    cfg = dataclasses.replace(SMALL, num_layers=2, remat="full", scan_layers=scan_layers)
    loss, params = _loss_and_params(cfg, rows=4, seq=32)
    expected_loss, expected = jax.jit(jax.value_and_grad(loss))(params)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    param_shardings = models.Layout(cfg).shardings(mesh)

    def sharded(p):
        if mesh_context == "set_mesh":
            return jax.value_and_grad(loss)(p)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss)(p)

    step = jax.jit(sharded, in_shardings=(param_shardings,), out_shardings=(None, param_shardings))
    placed = jax.device_put(params, param_shardings)
    if mesh_context == "set_mesh":
        with jax.set_mesh(mesh):
            value, got = step(placed)
            hlo = step.lower(placed).as_text()
    else:
        value, got = step(placed)
        hlo = step.lower(placed).as_text()
    assert hlo.count("sharding_constraint") >= 10  # the constraints reached the compiler
    np.testing.assert_allclose(value, expected_loss, rtol=1e-5)
    got, expected = jax.device_get((got, expected))
    for name, g in expected.items():
        assert np.linalg.norm(got[name] - g) <= 1e-5 * np.linalg.norm(g), name
