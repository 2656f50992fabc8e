"""Attention and rotary embeddings, written for packed rows.

Packed rows carry `segment_ids` (0 = padding) and per-segment `positions`: a token attends to earlier
tokens of its own segment only (and, on sliding-window layers, to the last `sliding_window` of them).
K/V heads are shared by groups of query heads (GQA) by reshaping the queries, never by repeating K/V.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jsft.models.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [head_dim // 2], scaled as `linear` or Llama 3 RoPE scaling asks."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates [batch, seq, heads, head_dim] by position, in the half-split layout HF models use."""
    freqs = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)`: Gemma 2's bound on attention scores and logits (identity for None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """[batch, 1, 1, q, k] boolean: causal, within one segment, and within the window if any.

    The window counts tokens of the row (q_index - k_index < sliding_window), as transformers does;
    inside one segment that equals the distance in positions.
    """
    seq = segment_ids.shape[1]
    q_index, k_index = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    allowed = k_index <= q_index
    if sliding_window is not None:
        allowed &= q_index - k_index < sliding_window
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (allowed[None] & same_segment)[:, None, None]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain XLA attention, the reference every faster backend is tested against.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]. Scores and softmax are
    float32; scores are `scale * q.k`, soft-capped before masking as in transformers.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, logit_softcap)
    scores = jnp.where(attention_mask(segment_ids, sliding_window), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
