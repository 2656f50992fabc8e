"""The loss family against an independent float64 NumPy reference, and the step's full gradient tree.

Reference: per trained token `lse - logit[target] + z * lse**2`, where logits are first capped to
`cap * tanh(logits / cap)` for Gemma 2. It is computed here from the model's hidden states and output
kernel in float64, never through `jsft.loss`. Gradients are read exactly from the train step by an
optimizer that stores them (no update, no float32 `end - start`), and compared tensor by tensor with
`jax.grad` of a plain re-implementation of the masked mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import gradient_recorder, make_hf_family

from jsft import loss, models, sharding
from jsft.config import default_config
from jsft.trainer import Trainer

GEMMA_CAP = 3.0  # final_logit_softcapping of the tiny Gemma 2 in conftest


def reference_token_losses(logits, targets, z_loss: float = 0.0, softcap: float | None = None) -> np.ndarray:
    """float64 `lse - target + z * lse**2` of each position, after `cap * tanh(logits / cap)`."""
    x = np.asarray(logits, np.float64)
    if softcap:
        x = softcap * np.tanh(x / softcap)
    peak = x.max(-1, keepdims=True)
    lse = (peak + np.log(np.exp(x - peak).sum(-1, keepdims=True)))[..., 0]
    target = np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]
    return lse - target + z_loss * lse**2


def make_trainer(folder, mesh=None, optimizer=None, **overrides) -> tuple[Trainer, object]:
    """(trainer, fresh state) over a model folder; `overrides` set `group__key` config values."""
    mesh = mesh or sharding.single_device_mesh()
    model_cfg, _ = models.config_from_folder(str(folder))
    cfg = default_config()
    cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.clip_grad_norm = 1e-3, 0.0, 0.0
    for name, value in overrides.items():
        group, key = name.split("__")
        cfg[group][key] = value
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=10, optimizer=optimizer)
    return trainer, trainer.fresh_state(models.load_params(str(folder), trainer.layout, mesh))


def packed_batch(seed: int = 0, rows: int = 8, seq: int = 24, vocab: int = 96, trained: float = 0.5) -> dict:
    """Rows packed with several examples each, padding, a row without trained tokens."""
    rng = np.random.default_rng(seed)
    lengths = [[10, 14], [24], [5, 7, 12], [20], [3, 21], [24], [8, 8, 8], [16]]
    seg = np.zeros((rows, seq), np.int32)
    pos = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start = 0
        for s, n in enumerate(lengths[r % len(lengths)]):
            seg[r, start : start + n], pos[r, start : start + n] = s + 1, np.arange(n)
            start += n
    mask = ((rng.random((rows, seq)) < trained) & (seg > 0)).astype(np.int32)
    mask[0, :] = 0
    return {
        "input_ids": rng.integers(1, vocab, (rows, seq)).astype(np.int32),
        "target_ids": rng.integers(1, vocab, (rows, seq)).astype(np.int32),
        "loss_mask": mask,
        "segment_ids": seg,
        "positions": pos,
    }


def raw_logits64(trainer: Trainer, params, batch) -> np.ndarray:
    """Uncapped logits in float64 from the model's float32 hidden states and output kernel."""
    model = trainer.layout.merge(jax.device_get(params))
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    return np.asarray(hidden, np.float64) @ np.asarray(model.output_kernel(), np.float64)


def reference_sum(trainer, params, batch, z_loss=0.0) -> float:
    cap = trainer.layout.cfg.final_logit_softcap
    per_token = reference_token_losses(raw_logits64(trainer, params, batch), batch["target_ids"], z_loss, cap)
    return float((per_token * batch["loss_mask"]).sum())


def plain_mean_loss(layout, batch, z_loss: float, softcap: float | None):
    """The masked mean written out with jnp (float32), independent of jsft.loss and its custom VJP."""

    def mean_loss(params):
        model = layout.merge(params)
        logits = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
        logits = logits @ model.output_kernel()
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, batch["target_ids"][..., None], -1)[..., 0]
        per_token = lse - target + z_loss * lse**2
        return jnp.sum(per_token * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    return mean_loss


def relative_differences(got: dict, expected: dict) -> dict[str, float]:
    return {k: float(np.linalg.norm(got[k] - expected[k]) / np.linalg.norm(expected[k])) for k in expected}


def step_gradient(trainer, state, batch) -> tuple[dict, dict]:
    """(the gradient the train step computed, its metrics)."""
    new_state, metrics = trainer.train_step(state, batch)
    return jax.device_get(new_state.opt_state["grads"]), jax.device_get(metrics)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma2")
    make_hf_family(folder, "gemma2")
    return folder


@pytest.fixture(params=["llama", "gemma2_softcap"])
def model_and_z(request, hf_llama, gemma2):
    """(model folder, z_loss): plain Llama without z-loss, Gemma 2 with soft-capping and z-loss."""
    return (hf_llama, 0.0) if request.param == "llama" else (gemma2, 0.1)


@pytest.mark.parametrize("z_loss, softcap", [(0.0, None), (0.1, None), (0.1, 3.0)])
def test_token_loss_sum_and_chunked_loss_equal_the_float64_reference(z_loss, softcap):
    """Tolerance 1e-6: float32 logsumexp over 50 logits of size ~3 rounds at ~1e-7 relative."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 37, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (2, 37)).astype(np.int32)
    mask = (rng.random((2, 37)) < 0.6).astype(np.int32)
    logits64 = hidden.astype(np.float64) @ kernel.astype(np.float64)
    expected = (reference_token_losses(logits64, targets, z_loss, softcap) * mask).sum()
    plain = loss.token_loss_sum(jnp.asarray(hidden) @ jnp.asarray(kernel), targets, mask, z_loss, softcap)
    chunked = loss.chunked_loss_sum(
        hidden, kernel, targets, mask, chunk_size=8, z_loss=z_loss, softcap=softcap
    )
    assert float(plain) == pytest.approx(expected, rel=1e-6)
    assert float(chunked) == pytest.approx(expected, rel=1e-6)


def test_model_logits_are_soft_capped_gemma2(gemma2):
    trainer, state = make_trainer(gemma2)
    batch = packed_batch(seed=3)
    params = jax.device_get(state.params)
    capped = trainer.layout.merge(params)(batch["input_ids"], batch["positions"], batch["segment_ids"])
    raw = raw_logits64(trainer, params, batch)
    assert np.abs(raw).max() > GEMMA_CAP  # the cap bites
    np.testing.assert_allclose(capped, GEMMA_CAP * np.tanh(raw / GEMMA_CAP), atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_loss_equals_the_reference_with_z_loss_from_the_config(model_and_z, reduction):
    """`train.z_loss` reaches the step: its logged loss is the reference mean including z * lse**2.

    Tolerance 1e-5 relative: the step's float32 loss over ~90 tokens against float64 (measured ~1e-7)."""
    folder, z_loss = model_and_z
    trainer, state = make_trainer(folder, train__z_loss=z_loss, train__loss_reduction=reduction)
    assert trainer.cfg.train.z_loss == z_loss
    batch = packed_batch(seed=5)
    tokens = int(batch["loss_mask"].sum())
    expected = reference_sum(trainer, state.params, batch, z_loss) / tokens
    without_z = reference_sum(trainer, state.params, batch) / tokens
    _, metrics = trainer.train_step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert int(metrics["trained_tokens"]) == tokens
    if z_loss:
        assert abs(expected - without_z) > 1e-2 * expected  # the z-loss term is far above the tolerance


def test_eval_step_and_evaluate_weigh_every_token_alike(model_and_z):
    """Eval has no z-loss; `evaluate` is the token-weighted mean over batches, not a mean of batch means.

    The second batch has few trained tokens whose targets are the model's own argmax (a low loss), so
    a per-batch average would differ from the per-token one by far more than the 1e-5 tolerance."""
    folder, z_loss = model_and_z
    trainer, state = make_trainer(folder, train__z_loss=z_loss)
    many = packed_batch(seed=7, trained=0.9)
    few = packed_batch(seed=8, trained=0.1)
    few["target_ids"] = raw_logits64(trainer, state.params, few).argmax(-1).astype(np.int32)
    sums = [reference_sum(trainer, state.params, b) for b in (many, few)]
    tokens = [int(b["loss_mask"].sum()) for b in (many, few)]
    for batch, expected_sum, expected_tokens in zip((many, few), sums, tokens, strict=True):
        out = jax.device_get(trainer.eval_step(state.params, state.base, batch))
        assert float(out["loss_sum"]) == pytest.approx(expected_sum, rel=1e-5)
        assert int(out["trained_tokens"]) == expected_tokens
    per_token = sum(sums) / sum(tokens)
    per_batch = np.mean([s / t for s, t in zip(sums, tokens, strict=True)])
    assert abs(per_batch - per_token) > 1e-2 * per_token
    assert trainer.evaluate(state, [many, few]) == pytest.approx(per_token, rel=1e-5)


def test_full_gradient_tree_equals_autodiff_of_the_plain_mean(model_and_z):
    """Every parameter's gradient (not the norm) against `jax.grad` of the written-out masked mean.

    Floor: the reference itself with the batch rows reversed (summation order only). The step (chunked
    loss, 2 micro-batches) may differ from the reference by at most 10x that floor per tensor; a sign
    flip or a gradient on the wrong parameter differs by ~1 or more."""
    folder, z_loss = model_and_z
    trainer, state = make_trainer(
        folder, optimizer=gradient_recorder(), train__z_loss=z_loss, train__grad_accum_steps=2
    )
    batch = packed_batch(seed=11)
    reversed_rows = {k: v[::-1].copy() for k, v in batch.items()}
    params = jax.device_get(state.params)
    cap = trainer.layout.cfg.final_logit_softcap
    reference = jax.device_get(jax.grad(plain_mean_loss(trainer.layout, batch, z_loss, cap))(params))
    reordered = jax.device_get(jax.grad(plain_mean_loss(trainer.layout, reversed_rows, z_loss, cap))(params))
    floor = max(relative_differences(reordered, reference).values())
    got, metrics = step_gradient(trainer, state, batch)
    assert set(got) == set(reference)
    differences = relative_differences(got, reference)
    print(f"z_loss {z_loss}: reordering floor {floor:.2e}; step vs reference {max(differences.values()):.2e}")
    assert 0 < floor < 1e-4
    for name, difference in differences.items():
        assert difference <= 10 * floor, (name, difference, floor)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(reference)), rel=1e-4)


def test_sum_gradient_is_mean_gradient_times_trained_tokens(hf_llama):
    """README: with `sum` the gradient is `mean`'s times the batch's trained tokens. Both scale the
    same float32 sum, so they agree to a few roundings (tolerance 1e-6 per tensor)."""
    batch = packed_batch(seed=13)
    tokens = int(batch["loss_mask"].sum())
    grads = {}
    for reduction in ("mean", "sum"):
        trainer, state = make_trainer(
            hf_llama,
            optimizer=gradient_recorder(),
            train__loss_reduction=reduction,
            train__grad_accum_steps=2,
        )
        grads[reduction], metrics = step_gradient(trainer, state, batch)
        assert int(metrics["trained_tokens"]) == tokens
    scaled = {k: v * tokens for k, v in grads["mean"].items()}
    for name, difference in relative_differences(grads["sum"], scaled).items():
        assert difference <= 1e-6, (name, difference)
