"""Cross-entropy over assistant tokens, computed in sequence chunks.

The [batch, seq, vocab] float32 logits are the largest tensor of an SFT step for 128k-256k vocabularies;
here each chunk of the sequence is projected, scored and discarded. The chunk length is chosen so a
chunk's logits fit a fixed budget, so peak memory stays flat as the vocabulary or the sequence grows.

The loss is a scalar, so its gradients with respect to the hidden states and the output kernel are
known up to the incoming scale while the logits of a chunk are still at hand: the forward pass computes
them right away (autodiff of the chunk's loss) and the backward pass only scales them. The logits are
then computed once instead of again in the backward pass: three [hidden, vocab] matmuls per token
instead of four.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jsft import sharding
from jsft.models.attention import soft_cap

# A chunk's float32 logits per device. Each chunk also adds its share into the float32 [hidden, vocab]
# gradient of the LM head: a whole read and write of it in HBM (8 bytes per weight) against the 2
# FLOPs per weight and token of that matmul, so the chunk needs about 4 x peak / HBM bandwidth tokens
# not to wait on memory (660 on v5p, 820 on H200). 512 MiB at a 128k vocabulary is 1024 tokens. At
# 64 MiB (128 tokens) the Tulu 8B step on v5p-64 (jsft.cli.tpu) waited 0.186 s a step on HBM in the
# head gradient's accumulation, of 2.563 s of ops; at 512 MiB none, at the same peak (50.60 GiB).
LOGITS_BUDGET_BYTES = 512 * 2**20
# On CPU the smaller chunks are the faster ones (they stay in cache; a CPU's balance point is a few
# tokens): the 60M Llama of tools/bench/step.py, alternating in one process, 9.72 s a step at 64 MiB
# against 11.65 s at 512.
CPU_LOGITS_BUDGET_BYTES = 64 * 2**20


def token_loss_sum(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0, softcap: float | None = None
) -> jax.Array:
    """Sum over masked positions of -log p(target) (+ z_loss * log(Z)^2); the reference for the chunked one.

    The z-loss term (PaLM) keeps the softmax normaliser near 1, which stabilises low-precision training.
    `softcap` applies Gemma 2's final-logit soft-capping first.
    """
    logits = soft_cap(logits.astype(jnp.float32), softcap)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    per_token = log_z - target_logit
    if z_loss:
        per_token = per_token + z_loss * jnp.square(log_z)
    return jnp.sum(per_token * mask)


def chunked_loss_sum(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    dtype: jnp.dtype | None = None,
) -> jax.Array:
    """`token_loss_sum(hidden @ kernel.astype(dtype), ...)` without materialising all logits at once
    (`dtype` None: the kernel's own).

    `chunk_size` (sequence positions per chunk) defaults to what keeps one chunk's float32 logits within
    LOGITS_BUDGET_BYTES on each device (CPU_LOGITS_BUDGET_BYTES on CPU). Under a mesh whose batch axes
    split the rows, each device runs the chunk loop over its own rows (`shard_map`), with the whole LM
    head: left to the partitioner, the loop gathered the FSDP-sharded head and all-reduced its gradient in
    every chunk, synchronously (the Tulu config's compiled TPU program: 128 of each per step, 250 GiB each
    way). The head enters the map split as its weights are and is put together there by
    `_gathered_by_shifts`.
    """
    batch_axes = _manual_batch_axes(batch=hidden.shape[0])
    token_axes = ("context",) if sharding.context_shards(hidden.shape[1]) > 1 else ()
    rows = hidden.shape[0] // math.prod(_axis_sizes(batch_axes))
    if chunk_size is None:
        on_cpu = (sharding.traced_platform() or jax.default_backend()) == "cpu"
        budget = CPU_LOGITS_BUDGET_BYTES if on_cpu else LOGITS_BUDGET_BYTES
        chunk_size = max(budget // (4 * rows * _per_device(kernel.shape[-1], "vocab")), 16)
    local = functools.partial(_chunked, chunk_size=chunk_size, z_loss=z_loss, softcap=softcap)
    manual = batch_axes + token_axes
    dtype = dtype or kernel.dtype
    if not manual:
        return local(hidden, kernel.astype(dtype), targets, mask)
    # Under context parallelism each device scores its own tokens (their order does not matter to a sum).
    rows_spec = P(batch_axes or None, *token_axes)
    embed_split = sharding.logical_to_spec(("embed", None), kernel.shape, jax.sharding.get_abstract_mesh())[0]
    split_axes = tuple(a for a in np.atleast_1d(embed_split) if a in manual) if embed_split else ()

    def per_device(h, k, t, m):
        if split_axes:
            h, k = _gradients_together(h, k)
            k = _gathered_by_shifts(k, split_axes, dtype)
        else:
            k = k.astype(dtype)
        return jax.lax.psum(local(h, k, t, m), manual)

    return jax.shard_map(
        per_device,
        in_specs=(rows_spec, P(split_axes or None, None), rows_spec, rows_spec),
        out_specs=P(),
        axis_names=set(manual),
        check_vma=False,
    )(hidden, kernel, targets, mask)


def _gathered_by_shifts(block: jax.Array, axes: tuple[str, ...], dtype: jnp.dtype) -> jax.Array:
    """The whole array from each device's `block` of rows along `axes`, as n-1 independent
    collective-permutes (device i sends its block to i+s, for every shift s) instead of an all-gather.

    The TPU compiler keeps a lone all-gather synchronous, and turns the reduce-scatter that is its
    gradient into an all-reduce of the whole array, which moves it twice (libtpu 0.0.52). Permutes are
    async and none waits for another; their transpose sends each device's share of the gradient back
    once. (The scheduler overlaps them with the work around the loss, not with the layer loops, whose
    own FSDP permutes hold the links.) The blocks travel in `dtype`, each shift's cast on its own, so
    the gradient's n blocks come back in `dtype` and are summed in the block's own dtype (float32
    parameters: float32)."""
    n = math.prod(_axis_sizes(axes))
    me = jax.lax.axis_index(axes)
    blocks = [block.astype(dtype)]  # the own block; shift s brings device (me - s)'s
    for shift in range(1, n):
        blocks.append(jax.lax.ppermute(block.astype(dtype), axes, [(i, (i + shift) % n) for i in range(n)]))
    by_device = jnp.stack(blocks)[(me - jnp.arange(n)) % n]
    return by_device.reshape(n * block.shape[0], *block.shape[1:])


@jax.custom_vjp
def _gradients_together(hidden: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The identity, whose gradients leave together: the layers' backward pass (which needs the
    hidden states' gradient) starts once the head's gradient is summed into its shards, so the whole
    head's gradient is not held through it (measured on the Tulu step on v5p-64: see README)."""
    return hidden, kernel


def _together_forward(hidden, kernel):
    return (hidden, kernel), None


def _together_backward(_, gradients):
    return tuple(jax.lax.optimization_barrier(gradients))


_gradients_together.defvjp(_together_forward, _together_backward)


def _manual_batch_axes(batch: int) -> tuple[str, ...]:
    """The mesh axes that split the batch rows (and divide them), when traced under a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in np.atleast_1d(sharding.LOGICAL_RULES["batch"]) if mesh.shape.get(a, 1) > 1)
    return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _axis_sizes(axes: tuple[str, ...]) -> list[int]:
    mesh = jax.sharding.get_abstract_mesh()
    return [mesh.shape[a] for a in axes]


def _chunked(hidden, kernel, targets, mask, *, chunk_size: int, z_loss: float, softcap: float | None):
    batch, seq, _ = hidden.shape
    chunk_size = min(chunk_size, seq)
    pad = -seq % chunk_size
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    chunks = (seq + pad) // chunk_size

    def split(x):
        return x.reshape(batch, chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)

    return _loss_over_chunks(split(hidden), kernel, split(targets), split(mask), z_loss, softcap)


def _per_device(size: int, logical_axis: str) -> int:
    """`size` divided by the mesh axes the logical axis is split over, when traced under a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    mesh_axes = sharding.LOGICAL_RULES[logical_axis]
    if mesh.empty or mesh_axes is None:
        return size
    shards = math.prod(mesh.shape[a] for a in np.atleast_1d(mesh_axes))
    return size // shards if size % shards == 0 else size


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_over_chunks(hidden, kernel, targets, mask, z_loss, softcap):
    """The summed loss of chunks [chunks, batch, chunk, ...]; without gradients (evaluation)."""

    def one_chunk(total, xs):
        h, t, m = xs
        return total + token_loss_sum(h @ kernel, t, m, z_loss, softcap), None

    total, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), (hidden, targets, mask))
    return total


def _loss_and_gradients(hidden, kernel, targets, mask, z_loss, softcap):
    """The loss and, per unit of incoming gradient, its gradients for hidden (per chunk) and kernel."""

    def chunk_loss(h, k, t, m):
        return token_loss_sum(h @ k, t, m, z_loss, softcap)

    def one_chunk(carry, xs):
        total, d_kernel = carry
        h, t, m = xs
        value, (d_h, d_k) = jax.value_and_grad(chunk_loss, argnums=(0, 1))(h, kernel, t, m)
        return (total + value, d_kernel + d_k.astype(jnp.float32)), d_h

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (total, d_kernel), d_hidden = jax.lax.scan(one_chunk, zeros, (hidden, targets, mask))
    return total, (d_hidden, d_kernel.astype(kernel.dtype))


def _backward(z_loss, softcap, gradients, g):
    d_hidden, d_kernel = gradients
    return (g * d_hidden).astype(d_hidden.dtype), (g * d_kernel).astype(d_kernel.dtype), None, None


_loss_over_chunks.defvjp(_loss_and_gradients, _backward)


def gradient_temp_bytes(batch: int, seq: int, hidden: int, vocab: int, chunk_size: int | None) -> dict:
    """XLA's temporary memory for the loss and its gradient, {"plain": ..., "chunked": ...} bytes.

    Compiled, never run, so any size can be measured on CPU: the plain loss holds all [B, T, V] logits,
    the chunked one a budget's worth (the benchmark in tools/ and the memory test both read this).
    """
    shapes = [
        jax.ShapeDtypeStruct((batch, seq, hidden), jnp.float32),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    ]

    def plain(h, k, t, m):
        return token_loss_sum(h @ k, t, m)

    def chunked(h, k, t, m):
        return chunked_loss_sum(h, k, t, m, chunk_size=chunk_size)

    def temp_bytes(fn) -> int:
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    return {"plain": temp_bytes(plain), "chunked": temp_bytes(chunked)}
