"""Model FLOPs per trained token and MFU, so runs on different hardware and sizes compare on one scale.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / the device's peak FLOP/s. "Model"
FLOPs come from the architecture alone: recomputation (remat, the chunked loss's second LM-head pass),
optimizer arithmetic and elementwise work are not counted, so MFU does not reward doing extra work.

jsft's MFU (the training log's `mfu` and the roofline of `jsft.planning.roofline`) counts causal
attention: `mfu_flops_per_token`, MFU_DEFINITION. PaLM's count charges every query for all T keys, which
a causal kernel (splash, jsft's xla attention) never computes: with it a compute-bound step would show
an MFU above 1 (up to 1.07 for Llama 3.1 8B at 4096 tokens).
"""

from __future__ import annotations

import jax

from jsft import hardware
from jsft.models.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
    """Training (forward + backward) model FLOPs per token of rows `seq_len` long.

    A matmul costs 2 FLOPs per multiply-add; the backward pass costs twice the forward (a gradient for
    the input and one for the weight), so training = 3 x forward. Per token, forward:

        projections  2 * L * (d * Dh * (2 * H + 2 * K) + 3 * d * F)  q, k, v, o (GQA sizes), gate/up/down
        LM head      2 * d * V                                       also when tied; embedding lookup is free
        attention    2 * L * 2 * H * Dh * T_att                      q.k scores and probs @ v

    with L layers, hidden d, H query heads, K kv heads, head_dim Dh, MLP width F, vocabulary V. With
    experts, 3 * d * F becomes 3 * d * k * F_e + d * E: the k experts of width F_e a token is sent to
    and the router over E experts (active parameters; dispatch and combine are not counted). With
    T_att = seq_len (`causal=False`, the default) this is PaLM's 6N + 12 * L * H * Dh * T: every row
    pays for the whole T x T score matrix, as PaLM defines MFU (jsft's xla attention skips key blocks
    past each query block, so it executes less). With
    `causal=True`, T_att = seq_len / 2, the convention of current MaxText, whose published MFUs are then
    comparable. Sliding-window layers attend to min(window, seq_len) keys per query instead (halved
    too when causal, as MaxText does for Gemma 2). Packed rows are charged as one sequence of `seq_len`.
    """
    d, f, h, kv, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    keys = [
        min(cfg.sliding_window, seq_len) if cfg.is_sliding(layer) else seq_len
        for layer in range(cfg.num_layers)
    ]
    attended = sum(keys) / 2 if causal else sum(keys)
    mlp = 3 * d * f
    if cfg.experts is not None:  # the k experts each token is sent to, and the router
        mlp = 3 * d * cfg.experts.per_token * cfg.experts.intermediate_size + d * cfg.experts.count
    projections = cfg.num_layers * (d * dh * (2 * h + 2 * kv) + mlp)
    attention = 2 * h * dh * attended
    forward = 2 * projections + 2 * d * cfg.vocab_size + 2 * attention
    return 3.0 * forward


MFU_DEFINITION = (
    "model FLOPs with causal attention (6N-style dense FLOPs + attention over T/2 keys per query on average, "
    "MaxText's convention; remat, optimizer and elementwise work not counted) per second and device, "
    "every position of a row counted (padding included), / the device's dense bf16 peak"
)


def mfu_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The training FLOPs per token jsft's MFU counts everywhere (MFU_DEFINITION): causal attention."""
    return flops_per_token(cfg, seq_len, causal=True)


def device_peak_flops(device: jax.Device | None = None, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default: the first; `hardware.CHIPS`), `override` if given,
    None if unknown."""
    if override is not None:
        return override
    device = device if device is not None else jax.devices()[0]
    return hardware.peak_flops(device.device_kind)


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the fraction of `peak` spent on the model's own FLOPs."""
    return tokens_per_sec_per_device * flops_per_token / peak
