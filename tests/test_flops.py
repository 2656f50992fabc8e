"""The FLOP count against a hand computation, the PaLM 6N identity, and XLA's count of the compiled step."""

from __future__ import annotations

import types

import jax
import pytest

from jsft import flops, models, sharding
from jsft.config import default_config
from jsft.models import attention
from jsft.models.config import ModelConfig
from jsft.trainer import Trainer


def _config(**overrides) -> ModelConfig:
    sizes = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=72,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,  # not hidden / heads, so a formula using hidden_size for q/o shows
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    return ModelConfig(**(sizes | overrides))


def test_count_matches_hand_computation():
    # Per layer: q 48*6*8 = 2304, k 48*2*8 = 768, v 768, o 2304; MLP 3*48*72 = 10368: 16512 weights.
    # Two layers 33024 + LM head 48*97 = 4656 -> 37680 weights -> 75360 forward matmul FLOPs per token.
    # Attention per layer: scores 2*6*8*24 = 2304, values 2304 -> 2 layers: 9216 (full T x T).
    # Forward 84576, training 3x: 253728. Causal halves attention: 3 * (75360 + 4608) = 239904.
    assert flops.flops_per_token(_config(), 24) == 253728
    assert flops.flops_per_token(_config(), 24, causal=True) == 239904


def test_sliding_layers_attend_to_the_window():
    # Layer 0 slides over 10 keys, layer 1 sees all 24: attention 2*6*8*(10 + 24) * 2 (scores, values) =
    # 6528 forward instead of 9216, so training drops by 3 * (9216 - 6528) = 8064.
    cfg = _config(sliding_window=10, layer_types=("sliding_attention", "full_attention"))
    assert flops.flops_per_token(cfg, 24) == 253728 - 8064
    assert flops.flops_per_token(cfg, 8) == flops.flops_per_token(_config(), 8)  # window beyond the row


@pytest.mark.parametrize("tied", [False, True])
def test_count_is_palm_6n_plus_attention(tied):
    # PaLM: 6N + 12 * L * H * Dh * T, N = matmul weights (the LM head counts even when tied to the embedding).
    cfg = _config(tie_word_embeddings=tied, num_kv_heads=3, head_dim=16)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    embedding_lookup = 0 if tied else cfg.vocab_size * cfg.hidden_size
    matmul_weights = cfg.num_params() - norms - embedding_lookup
    seq = 100
    expected = 6 * matmul_weights + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    assert flops.flops_per_token(cfg, seq) == expected


# (config, seq, batch): projections dominate; attention is over half the count. The xla attention
# backend scores key blocks up to each query block's end (blocks of 256), so it executes the full
# T x T square for rows of one block and less than that, but more than the causal half, beyond.
XLA_CASES = [
    (
        dict(
            vocab_size=512, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2, head_dim=64
        ),
        128,
        2,
    ),
    (
        dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=2, head_dim=16),
        512,
        1,
    ),
]


@pytest.mark.parametrize("sizes, seq, batch", XLA_CASES)
def test_count_matches_xla_cost_analysis_of_the_train_step(sizes, seq, batch):
    """XLA counts every FLOP it executes: at least the causal model count, at most 12% above the full one.

    The surplus is work the model count leaves out on purpose: the chunked loss recomputes the LM head in
    the backward pass, AdamW does about a dozen FLOPs per parameter, and softmax, RMSNorm, RoPE and SiLU
    are elementwise (measured: +3% and +8% for these two cases). XLA counts a while loop's body once,
    so the step must run its scans once: one micro-batch, and logits small enough for one loss chunk.
    """
    cfg = _config(**sizes)
    train_cfg = default_config()
    train_cfg.optim.warmup_ratio, train_cfg.optim.schedule = 0.0, "constant"
    train_cfg.train.global_batch_size = batch
    trainer = Trainer(train_cfg, models.Layout(cfg), sharding.single_device_mesh(), total_steps=10)
    cost = trainer.compile_train_step(batch, seq).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returns one dict per program
    full = flops.flops_per_token(cfg, seq) * batch * seq
    causal = flops.flops_per_token(cfg, seq, causal=True) * batch * seq
    assert causal <= cost["flops"] <= 1.12 * full
    if seq <= attention.XLA_QUERY_BLOCK:  # one query block: the whole square is scored
        assert cost["flops"] >= full


def test_peak_lookup_override_and_mfu():
    assert flops.device_peak_flops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert flops.device_peak_flops(types.SimpleNamespace(device_kind="NVIDIA H200")) == 989e12
    assert flops.device_peak_flops(jax.devices("cpu")[0]) is None
    assert flops.device_peak_flops(jax.devices("cpu")[0], override=1e11) == 1e11
    assert flops.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
