"""Rotary position embeddings: the inverse frequencies of every RoPE scaling, as transformers'
`modeling_rope_utils` computes them, the (cos, sin) tables and the rotation.

The scalings that depend on the sequence length (`dynamic`, `longrope`) take it as transformers'
`dynamic_rope_update` does: the largest position id of the batch + 1. jsft restarts positions per
packed sequence and gives padding position 0, so that is the longest sequence in the batch: what
transformers picks for a batch padded to its longest sequence (its collators' default) or for
padding-free packed rows (position ids restarting per sequence). Rows packed with positions running
across the whole row, or padded to a fixed length with positions running on, would make transformers
pick by the row length instead. transformers' dynamic RoPE also keeps the largest length it has seen
until a sequence shorter than `max_position_embeddings` resets it; jsft's is a function of each batch,
i.e. transformers' on a freshly loaded model. "The batch" is the whole micro-batch of the step across
devices; transformers under data parallelism decides on each device's own rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jsft.models.config import RopeScaling


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None, seq_len: jax.Array | int = 0
) -> jax.Array:
    """Inverse frequencies [head_dim // 2], as transformers computes them for each RoPE scaling.

    `seq_len` is what transformers' `dynamic_rope_update` calls the current sequence length: the batch's
    largest position + 1 (traced), which `dynamic` grows the base by and `longrope` picks its factors by.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if scaling.rope_type == "yarn":
        return _yarn_frequencies(inv_freq, head_dim, theta, scaling)
    if scaling.rope_type == "longrope":
        long = jnp.asarray(seq_len) > scaling.original_max_position_embeddings
        divisors = jnp.where(long, jnp.float32(scaling.long_factor), jnp.float32(scaling.short_factor))
        return 1.0 / (divisors * theta**exponents)
    # dynamic NTK: below max_position_embeddings the base is unchanged, past it it grows with the length
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), scaling.max_position_embeddings)
    stretch = scaling.factor * length / scaling.max_position_embeddings - (scaling.factor - 1)
    base = theta * stretch ** (head_dim / (head_dim - 2))
    return 1.0 / (base**exponents)


def _llama3_frequencies(inv_freq: jax.Array, scaling: RopeScaling) -> jax.Array:
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


def _yarn_frequencies(inv_freq: jax.Array, head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """YaRN: original frequencies for dimensions that turn more than `beta_fast` times over the original
    context, interpolated (divided by `factor`) below `beta_slow` turns, a linear ramp between."""

    def dimension_of(turns: float) -> float:  # the dimension whose wave turns `turns` times in the context
        context = scaling.original_max_position_embeddings
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, dtype, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [batch, seq, 1, head_dim] of each position's rotation angles times `scale` (YaRN's and
    LongRoPE's attention factor), in `dtype`.

    Computed once per forward pass and shared by every layer of the same RoPE settings.
    """
    freqs = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [batch, seq, heads, head_dim] by `rope_tables`, in the half-split layout HF models use."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
