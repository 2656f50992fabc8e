"""Attention, written for packed rows (the rotary embeddings it takes are `rope.py`'s).

Packed rows carry `segment_ids` (0 = padding) and per-segment `positions`: a token attends to earlier
tokens of its own segment only (and, on sliding-window layers, to the last `sliding_window` of them).
K/V heads are shared by groups of query heads (GQA) by reshaping the queries, never by repeating K/V.

Three backends compute the same thing: `dot_product_attention` (plain XLA, the reference),
`masked_attention` (`jax.nn.dot_product_attention`, run by cuDNN on NVIDIA GPUs) and `splash_attention`
(the Pallas splash kernel on TPUs). `resolve_attention_impl` turns `model.attention` into one of them.
Decoding (`jsft.generate`) attends through a `KVCache` with `cached_attention`, whatever the backend.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jsft import sharding
from jsft.errors import ModelOptionError
from jsft.models.config import ModelConfig

log = logging.getLogger(__name__)

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256
SPLASH_BLOCK_SIZE = 512  # MaxText's choice; clipped to the sequence length
SPLASH_MIN_BLOCK = 128  # the kernel's lane width: blocks (and so rows) are multiples of it


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


XLA_QUERY_BLOCK = 128


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    sliding_window: int | None = None,
    block: int = XLA_QUERY_BLOCK,
) -> jax.Array:
    """`dot_product_attention`'s result with less work: the "xla" backend.

    Heads come first ([batch, kv_heads, group, seq, head_dim]) so the score matmuls are plain batched
    matmuls, and queries go in blocks that only score the keys they can see: none after the block's
    end (the causal upper triangle) and, with a sliding window, none before its reach. One layer's
    attention forward+backward on a 2-core CPU (batch 4 x 1024, 8 heads of 64; `tools/bench/attention.py`):
    0.66 s for the reference, 0.22 s here (blocks of 128, normalised after the value matmul), 0.11 s
    for torch SDPA.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # Materialise the heads-major copies once: otherwise XLA fuses their producers (RoPE, cos and sin
    # included) into every block's slice and recomputes them per block (measured: +0.3 s per layer).
    qh, kh, vh = jax.lax.optimization_barrier((qh, kh, vh))
    outputs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first_key = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts",
            qh[:, :, :, start:end],
            kh[:, :, first_key:end],
            preferred_element_type=jnp.float32,
        )
        scores = soft_cap(scores * scale, logit_softcap)
        q_index = jnp.arange(start, end)[:, None]
        k_index = jnp.arange(first_key, end)[None, :]
        allowed = k_index <= q_index
        if sliding_window is not None:
            allowed &= q_index - k_index < sliding_window
        same_segment = segment_ids[:, start:end, None] == segment_ids[:, None, first_key:end]
        mask = (allowed[None] & same_segment)[:, None, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        # softmax(s) @ v as (exp(s - max) @ v) / sum(exp(s - max)): the division touches [t, d], not
        # [t, s]. The max only guards the exponent (softmax does not depend on it), so no gradient
        # flows through it. Every query sees at least itself, so the sum is at least 1.
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        out = jnp.einsum(
            "bkgts,bksd->bkgtd",
            weights.astype(v.dtype),
            vh[:, :, first_key:end],
            preferred_element_type=jnp.float32,
        )
        outputs.append((out / weights.sum(axis=-1)[..., None]).astype(v.dtype))
    out = jnp.concatenate(outputs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _is_nvidia_gpu(device: jax.Device) -> bool:
    return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


def _cudnn_problem(cfg: ModelConfig) -> str | None:
    """Why cuDNN's fused attention cannot run this model, or None if it can."""
    if jnp.dtype(cfg.dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return f"compute dtype {jnp.dtype(cfg.dtype).name} (cuDNN needs bfloat16 or float16)"
    if cfg.head_dim % 8 or cfg.head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head_dim {cfg.head_dim} (cuDNN needs a multiple of 8, at most {CUDNN_MAX_HEAD_DIM})"
    if cfg.attn_logit_softcap is not None:
        return "attention logit soft-capping (Gemma 2), which cuDNN does not do"
    return None


def resolve_attention_impl(cfg: ModelConfig, device: jax.Device | None = None) -> str:
    """The backend `cfg.attention_impl` means on `device` (default: the first device).

    "auto" takes cuDNN on NVIDIA GPUs when the model allows it (else XLA, with a warning saying why),
    splash on TPUs, XLA elsewhere. An explicit choice that cannot run here is an error, not a fallback.
    """
    device = device or jax.devices()[0]
    requested = cfg.attention_impl
    if requested == "auto":
        if device.platform == "tpu":
            return "splash"
        if _is_nvidia_gpu(device):
            problem = _cudnn_problem(cfg)
            if problem is None:
                return "cudnn"
            log.warning("model.attention=auto: using xla attention instead of cudnn because of %s", problem)
        return "xla"
    where = f"{device.platform} device ({device.device_kind})"
    if requested == "cudnn":
        if not _is_nvidia_gpu(device):
            raise ModelOptionError(f"model.attention=cudnn needs an NVIDIA GPU; this is a {where}")
        problem = _cudnn_problem(cfg)
        if problem is not None:
            raise ModelOptionError(f"model.attention=cudnn cannot run this model: {problem}; use auto or xla")
    if requested == "splash" and device.platform != "tpu":
        raise ModelOptionError(f"model.attention=splash needs a TPU; this is a {where}")
    return requested


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """`jax.nn.dot_product_attention` over packed rows: the cuDNN path, testable on CPU as "xla".

    It has no segment ids, so the packed mask goes in as a boolean [batch, 1, q, k] array; `is_causal`
    and the window are passed as well so cuDNN can skip the blocks they exclude. GQA is native.
    """
    mask = attention_mask(segment_ids, sliding_window)[:, :, 0]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=window,
        implementation=implementation,
    )


def splash_block_size(seq: int, block_size: int = SPLASH_BLOCK_SIZE) -> int:
    """`block_size` clipped to `seq`, which it must divide; blocks are multiples of 128."""
    block = min(block_size, seq)
    if seq % SPLASH_MIN_BLOCK or block % SPLASH_MIN_BLOCK or seq % block:
        raise ModelOptionError(
            f"splash attention needs rows that are a multiple of its block size {block} (and of "
            f"{SPLASH_MIN_BLOCK}); got {seq} tokens: set data.max_seq_length to a multiple of {block}"
        )
    return block


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    sliding_window: int | None = None,
    block_size: int = SPLASH_BLOCK_SIZE,
    interpret: bool = False,
) -> jax.Array:
    """Pallas splash attention (TPU): causal or local mask, segment ids, GQA and soft-capping in the kernel.

    Under a mesh (`jax.set_mesh` / `jax.sharding.use_abstract_mesh`) the kernel runs per shard through
    `shard_map`, rows split like the batch and heads over `tensor` when both head counts allow it; the
    partitioner cannot split a Pallas call by itself. `interpret=True` runs it on CPU, for tests.
    """
    block = splash_block_size(q.shape[1], block_size)
    local = functools.partial(
        _splash_per_shard,
        scale=scale,
        logit_softcap=logit_softcap,
        sliding_window=sliding_window,
        block=block,
        interpret=interpret,
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    batch_axes = sharding.logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    head_axes = sharding.logical_to_spec(("heads", "kv_heads"), (q.shape[2], k.shape[2]), mesh)
    heads = head_axes[0] if head_axes[0] == head_axes[1] else None
    qkv_spec = P(batch_axes, None, heads, None)
    return jax.shard_map(
        local,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes, None)),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


def _splash_per_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None,
    sliding_window: int | None,
    block: int,
    interpret: bool,
) -> jax.Array:
    seq, heads = q.shape[1], q.shape[2]
    if sliding_window is None:
        head_mask = splash.CausalMask((seq, seq))
    else:  # keys k with q - (window - 1) <= k <= q, i.e. q - k < window
        head_mask = splash.LocalMask((seq, seq), window_size=(sliding_window - 1, 0), offset=0)
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=logit_softcap,
        interpret=interpret,
    )

    def heads_first(x: jax.Array) -> jax.Array:
        return x.transpose(0, 2, 1, 3)

    segments = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(
        heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), segments
    )
    return heads_first(out)


def attend(
    implementation: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention by the resolved backend ("xla", "cudnn" or "splash"); shapes as `dot_product_attention`."""
    if implementation == "splash":
        return splash_attention(
            q, k, v, segment_ids, scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window
        )
    if implementation == "cudnn":  # resolve_attention_impl never picks it for soft-capped models
        return masked_attention(q, k, v, segment_ids, scale=scale, sliding_window=sliding_window)
    return blocked_attention(
        q, k, v, segment_ids, scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens decoded so far, in a static number of slots (one compile per size).

    `keys`/`values` are [layers, batch, slots, kv_heads, head_dim] in the decoder, one layer's
    [batch, slots, kv_heads, head_dim] inside a layer. Slot order is token order within a row, so a
    sliding window counts slots as training counts row indices. `segment_ids` [batch, slots] is 0 for
    padding and slots not written yet; `index` is the first slot of the tokens being run.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            keys=jnp.zeros(shape, cfg.dtype),
            values=jnp.zeros(shape, cfg.dtype),
            segment_ids=jnp.zeros((batch, slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    segment_ids: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """The new tokens' attention over one layer's cache with their own keys and values written in.

    q: [batch, t, heads, head_dim] at slots `cache.index + [0, t)`; k, v: their [batch, t, kv_heads,
    head_dim]; `cache.segment_ids` already holds their segment ids. Masking as in
    `dot_product_attention`, by slot: causal, same segment, within the window.
    """
    b, t, h, d = q.shape
    start = (0, cache.index, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start)
    values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start)
    kv_heads = keys.shape[2]
    grouped = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, keys, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, logit_softcap)
    q_slot = cache.index + jnp.arange(t)[:, None]
    k_slot = jnp.arange(keys.shape[1])[None, :]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed &= q_slot - k_slot < sliding_window
    same_segment = segment_ids[:, :, None] == cache.segment_ids[:, None, :]
    mask = (allowed[None] & same_segment)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h, d)
