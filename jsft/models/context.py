"""Attention when a row's tokens are split over the mesh's context axis (context parallelism).

Each device holds its queries (two chunks of the row in `sharding.context_order`: one early, one late)
and gathers every key and value of the row, with their segment ids, over the context axis; the
backward pass turns the gathers into reduce-scatters of the key and value gradients. Gathering costs
one row's keys and values per device and layer (8B at 128k tokens: 256 MiB of bf16 per layer), which
fits every size jsft plans for; a ring (passing key blocks around) would trade that memory for
latency-bound steps.

Masks compare token indices, not places: the query at place p is token `context_order[p]`. The "xla"
and "cudnn" backends score their queries against all keys with that mask (no causal skipping: the
zigzag order gives every device the same work); splash gets the index order as its mask's
`q_sequence`, so it still skips every key block the causal mask or the window excludes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jsft import sharding
from jsft.models.attention import SPLASH_BLOCK_SIZE, XLA_QUERY_BLOCK, soft_cap, splash_block_size


def context_attention(
    implementation: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    sliding_window: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`attention.attend`'s result for rows in `context_order` split over the traced mesh's context axis.

    Shapes as `attention.dot_product_attention`; rows split like the batch, heads over `tensor` when
    both head counts allow it. `interpret=True` runs splash on CPU, for tests.
    """
    mesh = jax.sharding.get_abstract_mesh()
    seq, shards = q.shape[1], sharding.context_shards(q.shape[1])
    batch_axes = sharding.logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    head_axes = sharding.logical_to_spec(("heads", "kv_heads"), (q.shape[2], k.shape[2]), mesh)
    heads = head_axes[0] if head_axes[0] == head_axes[1] else None
    qkv_spec, rows_spec = P(batch_axes, "context", heads, None), P(batch_axes, "context")
    order = sharding.context_order(seq, shards)
    options = dict(scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window)
    if implementation == "splash":
        local_heads = q.shape[2] // (mesh.shape[heads] if heads else 1)
        kernel = _splash_kernel(seq, local_heads, order, shards, logit_softcap, sliding_window, interpret)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(None, "context")))
        local = functools.partial(_splash_per_shard, order=order, scale=scale)
        return jax.shard_map(
            local,
            in_specs=(kernel_spec, qkv_spec, qkv_spec, qkv_spec, rows_spec),
            out_specs=qkv_spec,
            check_vma=False,
        )(kernel, q, k, v, segment_ids)
    local = functools.partial(_by_index_per_shard, implementation, order=order, **options)
    return jax.shard_map(
        local, in_specs=(qkv_spec, qkv_spec, qkv_spec, rows_spec), out_specs=qkv_spec, check_vma=False
    )(q, k, v, segment_ids)


def _gather(x: jax.Array) -> jax.Array:
    """The whole row of `x` on every device of the context axis, in `context_order`."""
    return jax.lax.all_gather(x, "context", axis=1, tiled=True)


def _local_query_index(order: np.ndarray, local: int) -> jax.Array:
    """The token index of each of this device's `local` query places."""
    start = jax.lax.axis_index("context") * local
    return jax.lax.dynamic_slice_in_dim(jnp.asarray(order, jnp.int32), start, local)


def _by_index_per_shard(
    implementation: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    order: np.ndarray,
    scale: float,
    logit_softcap: float | None,
    sliding_window: int | None,
) -> jax.Array:
    """One device's queries against the gathered row, masked by token index and segment."""
    keys, values, key_segments = _gather(k), _gather(v), _gather(segment_ids)
    q_index = _local_query_index(order, q.shape[1])
    k_index = jnp.asarray(order, jnp.int32)  # the gathered row is in context order

    def mask(q_places: slice) -> jax.Array:  # [batch, q, k]
        qi = q_index[q_places][:, None]
        allowed = k_index[None, :] <= qi
        if sliding_window is not None:
            allowed &= qi - k_index[None, :] < sliding_window
        same = segment_ids[:, q_places, None] == key_segments[:, None, :]
        return allowed[None] & same

    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            q, keys, values, mask=mask(slice(None))[:, None], scale=scale, implementation="cudnn"
        )
    b, t, h, d = q.shape
    kv_heads = keys.shape[2]
    grouped = q.reshape(b, t, kv_heads, h // kv_heads, d)
    outputs = []
    for start in range(0, t, XLA_QUERY_BLOCK):  # queries in blocks: scores of [block, row] at a time
        places = slice(start, min(start + XLA_QUERY_BLOCK, t))
        scores = jnp.einsum("btkgd,bskd->bkgts", grouped[:, places], keys, preferred_element_type=jnp.float32)
        scores = soft_cap(scores * scale, logit_softcap)
        scores = jnp.where(mask(places)[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        outputs.append(jnp.einsum("bkgts,bskd->btkgd", probs, values))
    return jnp.concatenate(outputs, axis=1).reshape(b, t, h, d)


def _splash_kernel(
    seq: int,
    heads: int,
    order: np.ndarray,
    shards: int,
    logit_softcap: float | None,
    sliding_window: int | None,
    interpret: bool,
) -> splash.SplashAttentionKernel:
    """Splash over the whole row's mask, its query rows in `order` and split into `shards` parts (each
    device's part of the block tables travels with its queries)."""
    block = splash_block_size(seq // shards, SPLASH_BLOCK_SIZE)
    if sliding_window is None:
        head_mask = splash.CausalMask((seq, seq), shard_count=shards)
    else:
        head_mask = splash.LocalMask(
            (seq, seq), window_size=(sliding_window - 1, 0), offset=0, shard_count=shards
        )
    head_mask.q_sequence = order.astype(np.int32)
    sizes = dict.fromkeys(
        (
            "block_q",
            "block_kv",
            "block_kv_compute",
            "block_q_dkv",
            "block_kv_dkv",
            "block_kv_dkv_compute",
            "block_q_dq",
            "block_kv_dq",
        ),
        block,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * heads),
        block_sizes=splash.BlockSizes(**sizes),
        head_shards=1,
        q_seq_shards=shards,
        attn_logits_soft_cap=logit_softcap,
        interpret=interpret,
    )


def _splash_per_shard(
    kernel: splash.SplashAttentionKernel,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    order: np.ndarray,
    scale: float,
) -> jax.Array:
    """One device's queries through splash against the gathered row, put back in row order (the
    kernel's key ids are row indices)."""
    in_row_order = np.argsort(order)
    keys, values, key_segments = (jnp.take(_gather(x), in_row_order, axis=1) for x in (k, v, segment_ids))

    def heads_first(x: jax.Array) -> jax.Array:
        return x.transpose(0, 2, 1, 3)

    segments = splash.SegmentIds(q=segment_ids, kv=key_segments)
    out = jax.vmap(kernel)(
        heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(keys), heads_first(values), segments
    )
    return heads_first(out)
