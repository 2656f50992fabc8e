"""One projection, the only place a kernel meets its input: plain, LoRA over a plain base, or LoRA over a
quantized frozen base (QLoRA), as torchtune's `LoRALinear` keeps a LoRA layer and its base together.

`Projection(x, dropout_key)` computes `y = x W + scale * (dropout(x) A) B`: W contracts x's trailing
`inputs` axes and keeps heads as their own axes ([embed, heads, head_dim], [heads, head_dim, embed]); A
[inputs..., rank] and B [rank, outputs...] exist only for the kernels the `LoraSpec` targets. In the layer
scan every parameter carries a leading "layers" axis and the scan hands each call one layer's slice, so a
quantized kernel is dequantized here one layer at a time: no merged or full-size copy of a frozen kernel
exists beyond this layer's, and (differentiating the factors only) no gradient for it ever does.

The flat parameter names keep the kernel under the projection's name ("layers.attn.q_proj") and the
factors beside it ("layers.attn.q_proj.lora_a", ".lora_b"): see `parameter_name`.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jsft import sharding
from jsft.lora.quant import Quantized
from jsft.lora.spec import LoraSpec

kernel_init = nnx.initializers.normal(stddev=0.02)


class LoraParam(nnx.Param):
    """A LoRA factor of a `Projection`: `lora_a` [inputs..., rank] or `lora_b` [rank, outputs...]."""


def parameter_name(path: tuple) -> str:
    """A variable's name in the flat parameter dict: its path joined by dots, a projection's kernel
    named after the projection itself ("layers.attn.q_proj", not "layers.attn.q_proj.kernel")."""
    return ".".join(map(str, path[:-1] if path[-1] == "kernel" else path))


class Projection(nnx.Module):
    """A kernel of `shape` ([inputs..., outputs...], logical `axes`) and, if `lora` targets `name`, its
    LoRA factors: A ~ N(0, 1/fan_in) and B = 0, so the adapted projection starts as the base one."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        axes: tuple[str, ...],
        inputs: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        lora: LoraSpec | None = None,
    ):
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype), out_sharding=axes)
        self.dtype = dtype  # the compute dtype
        self.output_name = name  # its output's name for per-tensor remat (`config.REMAT_NAMES`)
        outputs = len(shape) - inputs
        # x [..., inputs] . W [inputs, outputs] -> [..., outputs], e.g. "...a,abc->...bc" for q_proj
        letters = "abcdefgh"[: len(shape)]
        self.contraction = f"...{letters[:inputs]},{letters}->...{letters[inputs:]}"
        # counted from the end, so one layer's slice of a stacked kernel keeps it (`Quantized.axis`)
        self.last_input_axis = -outputs - 1
        self.lora = lora if lora is not None and name in lora.targets else None
        if self.lora is None:
            return
        rank = self.lora.rank
        a_init = nnx.initializers.normal(stddev=float(math.prod(shape[:inputs])) ** -0.5)
        a = a_init(rngs.params(), (*shape[:inputs], rank), param_dtype)
        self.lora_a = LoraParam(a, out_sharding=(*axes[:inputs], None))
        self.lora_b = LoraParam(
            jnp.zeros((rank, *shape[inputs:]), param_dtype), out_sharding=(None, *axes[inputs:])
        )
        self.dropout_stream = zlib.crc32(name.encode())  # this projection's own masks, per layer key

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """`x W` in the compute dtype, plus the LoRA update where there are factors. `dropout_key` (this
        layer's, None in evaluation) draws the mask on the factors' input at rate `lora.dropout`."""
        kernel = self.kernel.get_value()
        kernel = kernel.dequantize(self.dtype) if isinstance(kernel, Quantized) else kernel.astype(self.dtype)
        # on CPU the same product, with its gradient's transposes chosen for XLA:CPU (`_project_cpu`)
        if sharding.traced_platform() == "cpu":
            y = _project_cpu(self.contraction, x, kernel)
        else:
            y = jnp.einsum(self.contraction, x, kernel)
        if self.lora is not None:
            y = y + self._lora_update(x, dropout_key).reshape(y.shape)
        return checkpoint_name(y, self.output_name)

    def _lora_update(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """`scale * (dropout(x) A) B` as 2-D matmuls over x's trailing (contracted) axes, which A's leading
        axes match: XLA:CPU runs the same products written as batched einsums (and their transposes) about
        2x slower (measured)."""
        spec, dt = self.lora, self.dtype
        if spec.dropout > 0 and dropout_key is not None:
            key = jax.random.fold_in(dropout_key, self.dropout_stream)
            keep = jax.random.bernoulli(key, 1 - spec.dropout, x.shape)
            x = jnp.where(keep, x / (1 - spec.dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...], self.lora_b[...]
        rows = x.reshape(-1, math.prod(x.shape[-(a.ndim - 1) :]))
        h = (rows @ a.reshape(-1, spec.rank).astype(dt)) * jnp.asarray(spec.scale, dt)
        return h @ b.reshape(spec.rank, -1).astype(dt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _project_cpu(contraction: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`einsum(contraction, x, kernel)`, whose gradient transposes only the narrower operand, once.

    The kernel's gradient contracts the tokens, the leading axis of both x and dy; XLA:CPU's matmul
    (YNNPACK) takes neither operand in that layout, so XLA transposes one, and fuses the transpose into
    the loop that computes it: on the MLP's [tokens, 1536] gradient, the SwiGLU backward read from the
    layer scan's stacked residuals, that strided loop took 4-5x the matmul it feeds (a ~60M Llama's
    step, tools/bench/profile_step.py). Here the narrower of x and dy is transposed on its own, after a
    barrier (a contiguous copy), and the matmuls are plain 2-D ones.
    """
    return jnp.einsum(contraction, x, kernel)


def _project_cpu_fwd(contraction, x, kernel):
    return jnp.einsum(contraction, x, kernel), (x, kernel)


def _project_cpu_bwd(contraction, residuals, dy):
    x, kernel = residuals
    inputs = math.prod(kernel.shape[: len(contraction.split(",")[0]) - 3])  # "...ab,..." -> 2
    outputs = kernel.size // inputs
    dtype = jnp.result_type(x, kernel)
    rows_x, rows_dy = x.reshape(-1, inputs).astype(dtype), dy.reshape(-1, outputs).astype(dtype)
    matrix = kernel.reshape(inputs, outputs).astype(dtype)
    d_x = rows_dy @ matrix.T
    if inputs <= outputs:
        (x_t,) = jax.lax.optimization_barrier((rows_x.T,))
        d_kernel = x_t @ rows_dy
    else:
        (dy_t,) = jax.lax.optimization_barrier((rows_dy.T,))
        d_kernel = (dy_t @ rows_x).T
    return d_x.reshape(x.shape).astype(x.dtype), d_kernel.reshape(kernel.shape).astype(kernel.dtype)


_project_cpu.defvjp(_project_cpu_fwd, _project_cpu_bwd)
