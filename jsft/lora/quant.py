"""Block-wise quantization of frozen kernels (QLoRA): int8, or NF4 with two codes per byte.

Plain data and elementwise arithmetic only: the model (`models.projection`) dequantizes a `Quantized`
kernel one layer at a time inside the layer scan, so this module imports nothing of jsft.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct


def largest_divisor(n: int, at_most: int) -> int:
    """The block size along an axis of `n` values: its largest divisor up to `lora.quant_block`."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


@struct.dataclass
class Quantized:
    """A frozen kernel quantized in blocks of `block` consecutive values along `axis` (its last input
    axis, counted from the end so a layer slice of a stacked kernel keeps it), each block with its own
    float32 scale (absmax). int8: one code per value, value = code * scale, scale = absmax / 127. nf4:
    value = NF4_LEVELS[code] * absmax, two 4-bit codes per uint8 along `axis` (low nibble first)."""

    codes: jax.Array
    scales: jax.Array
    kind: str = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)
    block: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.codes.shape)
        shape[self.axis] *= 2 if self.kind == "nf4" else 1
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    def dequantize(self, dtype) -> jax.Array:
        shape = self.shape
        ax = len(shape) + self.axis
        codes = self.codes
        if self.kind == "nf4":
            codes = jnp.stack([codes & 15, codes >> 4], axis=ax + 1).reshape(shape)
            # codes are 0..15 by construction: no clamping of the indices (which XLA:CPU materialises)
            values = jnp.asarray(NF4_LEVELS).at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")
        else:
            values = codes.astype(jnp.float32)
        blocks = values.reshape(*shape[:ax], shape[ax] // self.block, self.block, *shape[ax + 1 :])
        return (blocks * jnp.expand_dims(self.scales, ax + 1)).reshape(shape).astype(dtype)


nnx.register_data_type(Quantized)  # a Param may hold one (the frozen base in `Layout.merge`)


def quantize(w: jax.Array, *, kind: str, axis: int, block: int) -> Quantized:
    """`w` quantized block-wise along `axis` (see `Quantized`); elementwise work only, no large table."""
    shape = w.shape
    ax = len(shape) + axis
    blocks = w.astype(jnp.float32).reshape(*shape[:ax], shape[ax] // block, block, *shape[ax + 1 :])
    absmax = jnp.max(jnp.abs(blocks), axis=ax + 1)
    if kind == "int8":
        scales = jnp.where(absmax > 0, absmax / 127.0, 1.0)
        codes = jnp.clip(jnp.round(blocks / jnp.expand_dims(scales, ax + 1)), -127, 127).astype(jnp.int8)
        return Quantized(codes.reshape(shape), scales, kind, axis, block)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normalized = (blocks / jnp.expand_dims(scales, ax + 1)).reshape(shape)
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # the nearest level: count the midpoints below
    codes = sum((normalized > m).astype(jnp.uint8) for m in midpoints)
    pairs = codes.reshape(*shape[:ax], shape[ax] // 2, 2, *shape[ax + 1 :])
    low, high = jnp.take(pairs, 0, axis=ax + 1), jnp.take(pairs, 1, axis=ax + 1)
    return Quantized((low | (high << 4)).astype(jnp.uint8), scales, kind, axis, block)
