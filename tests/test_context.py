"""Context parallelism: a row's tokens split over the mesh's context axis give one device's numbers.

The loss and the whole gradient tree of the training objective (`step._loss_sum`: decoder, chunked
loss) on 8 CPU devices with context = 2, 4, 8 (alone and with fsdp and tensor) are compared with one
device's, on packed rows of several segments each, with GQA, and on a Gemma-style model whose
sliding-window layers alternate with global ones. The floor is measured in the same test: the one-device
gradient of the same batch with its rows reversed (a different summation order only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model_config
from jax.sharding import PartitionSpec as P

from jsft import config, models, sharding, step
from jsft.errors import ConfigError
from jsft.models import context
from jsft.models.config import FULL_ATTENTION, SLIDING_ATTENTION

SEQ = 64
ROWS = 4

LLAMA = small_model_config(num_layers=2)  # GQA: 4 query heads over 2 key/value heads
GEMMA_STYLE = small_model_config(
    num_layers=2,
    sliding_window=9,
    layer_types=(SLIDING_ATTENTION, FULL_ATTENTION),
    attn_logit_softcap=20.0,
    final_logit_softcap=15.0,
)


def _batch(seed: int) -> dict[str, np.ndarray]:
    """Packed rows: segments of random lengths (some crossing the context chunks), positions restarting
    per segment, padding (segment 0) at the end, about half the tokens trained."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((ROWS, SEQ), np.int32)
    positions = np.zeros((ROWS, SEQ), np.int32)
    for row in range(ROWS):
        start, segment = 0, 1
        while start < SEQ - 6:
            length = min(int(rng.integers(3, 30)), SEQ - 6 - start)
            segments[row, start : start + length] = segment
            positions[row, start : start + length] = np.arange(length)
            start, segment = start + length, segment + 1
    return {
        "input_ids": rng.integers(0, LLAMA.vocab_size, (ROWS, SEQ)).astype(np.int32),
        "target_ids": rng.integers(0, LLAMA.vocab_size, (ROWS, SEQ)).astype(np.int32),
        "loss_mask": ((rng.random((ROWS, SEQ)) < 0.5) & (segments > 0)).astype(np.int32),
        "segment_ids": segments,
        "positions": positions,
    }


def _loss_and_grads(cfg, params, batch, mesh_shape: dict) -> tuple[float, dict]:
    """The summed loss and its gradient for every parameter, computed on `mesh_shape`."""
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    mesh = sharding.make_mesh(mesh_shape, devices)
    layout = models.Layout(cfg)
    params = jax.device_put(params, layout.shardings(mesh))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))

    def loss_sum(p, b):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step._loss_sum(layout, p, b)

    value, grads = jax.jit(jax.value_and_grad(loss_sum))(params, batch)
    return float(value), jax.device_get(grads)


def _peaked(params: dict) -> dict:
    """Queries and keys scaled up, so attention is far from uniform and a wrong mask shows (at the
    default init, scores are near 0 and a window or a leak across segments barely moves the loss)."""
    return {k: v * 6 if k.endswith(("q_proj", "k_proj")) else v for k, v in params.items()}


def _relative(a: dict, b: dict) -> dict[str, float]:
    return {k: float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in b}


@pytest.fixture(scope="module")
def reference():
    """`get(name)`: (cfg, params, batch, one-device loss and gradient, measured floor), once per model."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = {"gqa": LLAMA, "sliding_window": GEMMA_STYLE}[name]
            params = _peaked(jax.device_get(models.Layout(cfg).init(0, sharding.single_device_mesh())))
            batch = _batch(seed=3)
            one = {"data": 1}
            value, grads = _loss_and_grads(cfg, params, batch, one)
            reversed_rows = {k: v[::-1].copy() for k, v in batch.items()}
            _, reordered = _loss_and_grads(cfg, params, reversed_rows, one)
            floor = max(_relative(reordered, grads).values())
            cache[name] = (cfg, params, batch, value, grads, floor)
        return cache[name]

    return get


@pytest.mark.parametrize(
    "model, mesh_shape",
    [
        ("gqa", {"context": 2}),
        ("gqa", {"context": 4}),
        ("gqa", {"context": 8}),
        ("gqa", {"fsdp": 2, "context": 2, "tensor": 2}),
        ("gqa", {"data": 2, "fsdp": 2, "context": 2}),
        ("sliding_window", {"context": 4}),
        ("sliding_window", {"fsdp": 2, "context": 4}),
    ],
    ids=[
        "ctx2",
        "ctx4",
        "ctx8",
        "fsdp2_ctx2_tensor2",
        "data2_fsdp2_ctx2",
        "window_ctx4",
        "window_fsdp2_ctx4",
    ],
)
def test_context_parallel_loss_and_gradients_equal_one_device(reference, model, mesh_shape):
    cfg, params, batch, value, grads, floor = reference(model)
    got_value, got_grads = _loss_and_grads(cfg, params, batch, mesh_shape)
    differences = _relative(got_grads, grads)
    worst = max(differences, key=differences.get)
    print(f"{model} {mesh_shape}: floor {floor:.1e}, worst {differences[worst]:.1e} ({worst})")
    assert 0 < floor < 1e-5
    assert got_value == pytest.approx(value, rel=1e-5)
    for name, difference in differences.items():
        assert difference <= 10 * floor, (name, difference, floor)


def test_the_window_and_the_segments_matter_at_this_size(reference):
    """The cases above could not pass with a wrong mask: dropping the window or the segment ids moves
    the one-device gradient by far more than the tolerance."""
    cfg, params, batch, _, grads, floor = reference("sliding_window")
    _, no_window = _loss_and_grads(dataclasses.replace(cfg, layer_types=()), params, batch, {"data": 1})
    one_segment = {**batch, "segment_ids": np.ones_like(batch["segment_ids"])}
    _, no_segments = _loss_and_grads(cfg, params, one_segment, {"data": 1})
    assert max(_relative(no_window, grads).values()) > 1000 * floor
    assert max(_relative(no_segments, grads).values()) > 1000 * floor


def test_the_zigzag_order_balances_causal_work():
    """Device i holds chunks i and 2n-1-i: every device's queries see the same number of keys."""
    order = sharding.context_order(32, 4)
    assert sorted(order) == list(range(32))
    assert list(order[:8]) == [0, 1, 2, 3, 28, 29, 30, 31]
    keys_seen = (order + 1).reshape(4, 8).sum(axis=1)  # causal: token t sees t + 1 keys
    assert len(set(keys_seen)) == 1


def test_the_activations_and_attention_really_split_the_tokens():
    """The compiled program gathers keys over the context axis, and each device's hidden states hold
    only its own share of the tokens (not the whole row, which would merely replicate the work)."""
    mesh = sharding.make_mesh({"context": 8}, jax.devices())
    seq, heads, dim = 128, 4, 16
    q = jnp.zeros((2, seq, heads, dim))

    def run(q):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            segments = jnp.ones(q.shape[:2], jnp.int32)
            return context.context_attention("xla", q, q[:, :, :2], q[:, :, :2], segments, scale=0.25)

    spec = jax.sharding.NamedSharding(mesh, P(None, "context"))
    compiled = jax.jit(run, in_shardings=spec, out_shardings=spec).lower(q).compile()
    text = compiled.as_text()
    assert "all-gather" in text
    assert q.shape[1] // 8 == compiled.output_shardings.shard_shape(q.shape)[1]


def test_rows_must_divide_into_the_context_chunks():
    cfg = config.default_config()
    cfg.model.path, cfg.data.mixer = "m", (("d.jsonl", 1.0),)
    cfg.mesh.context = 4
    cfg.data.max_seq_length = 100
    with pytest.raises(ConfigError, match="max_seq_length=100 must divide into 2 x mesh.context = 8"):
        config.validate(cfg)


def test_rows_that_do_not_divide_run_with_plain_attention_under_the_same_mesh():
    """Scoring or decoding a prompt of any length under a context mesh still gives one device's logits."""
    cfg = dataclasses.replace(LLAMA, num_layers=1)
    layout = models.Layout(cfg)
    params = jax.device_get(layout.init(0, sharding.single_device_mesh()))
    ids = np.arange(2 * 13, dtype=np.int32).reshape(2, 13) % cfg.vocab_size
    expected = layout.merge(params)(jnp.asarray(ids))
    mesh = sharding.make_mesh({"context": 4}, jax.devices()[:4])

    def logits(p, ids):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return layout.merge(p)(ids)

    got = jax.jit(logits)(jax.device_put(params, layout.shardings(mesh)), ids)
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("sliding_window", [None, 40], ids=["causal", "sliding"])
def test_splash_over_the_context_axis_equals_the_reference_in_interpret_mode(sliding_window):
    """Splash's block tables follow the zigzag query order (its mask's `q_sequence`), split with the
    queries: values and gradients equal plain attention on the row in its own order."""
    from jsft.models import attention

    rng = np.random.default_rng(0)
    rows, seq = 2, 512
    q, k, v = (jnp.asarray(rng.normal(size=(rows, seq, h, 16)), jnp.float32) for h in (4, 2, 2))
    segments = np.ones((rows, seq), np.int32)
    segments[:, 200:] = 2  # a segment boundary inside the first device's late chunk
    segments[:, 480:] = 0
    segments = jnp.asarray(segments)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    options = dict(scale=0.25, sliding_window=sliding_window)
    mesh = sharding.make_mesh({"context": 2}, jax.devices()[:2])

    def split(q, k, v):
        q, k, v, seg = (sharding.to_context_order(x) for x in (q, k, v, segments))
        out = context.context_attention("splash", q, k, v, seg, interpret=True, **options)
        return jnp.sum(sharding.from_context_order(out) * weights)

    def reference(q, k, v):
        return jnp.sum(attention.dot_product_attention(q, k, v, segments, **options) * weights)

    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(q, k, v)
    expected, grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(got_grads, grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
