"""One Flax NNX decoder-only transformer for every supported family (Llama, Mistral, Qwen, OLMo 2, Gemma,
and the mixtures of experts Qwen3-MoE, Mixtral, OLMoE).

Families differ only through `ModelConfig` fields (norm placement and rounding, q/k norms, biases,
soft-capping, sliding windows, experts: `moe.py`), never through copies of this code. Parameters carry
logical axis names (`out_sharding`), which `jsft.sharding` maps onto mesh axes. Projection kernels keep
heads as their own axis ([embed, heads, head_dim]) so tensor parallelism can split heads without
reshapes. Activations are pinned to their logical axes too (`sharding.constrain`), when traced under a
mesh.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jsft import sharding
from jsft.lora.spec import LoraSpec
from jsft.models.attention import (
    KVCache,
    attend,
    cached_attention,
    resolve_attention_impl,
    soft_cap,
)
from jsft.models.config import AttentionKind, ModelConfig
from jsft.models.context import context_attention
from jsft.models.moe import MLP, MoE, RouterLosses, RouterStats, router_losses
from jsft.models.projection import Projection, kernel_init
from jsft.models.remat import ATTENTION_OUT, LAYER_INPUT, remat_policy
from jsft.models.rope import apply_rope, rope_frequencies, rope_tables

HIDDEN_AXES = ("batch", "sequence", "activation_embed")


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=kernel_init
) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


def _projection(
    cfg: ModelConfig,
    rngs: nnx.Rngs,
    lora: LoraSpec | None,
    name: str,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    inputs: int = 1,
) -> Projection:
    """A projection of the model's dtypes, with LoRA factors if `lora` targets `name`."""
    return Projection(
        name, shape, axes, inputs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, lora=lora
    )


class RMSNorm(nnx.Module):
    """RMS normalisation over the trailing `len(shape)` axes, rounding as the family's HF code does.

    Llama casts back to the input dtype, then scales; Gemma and OLMo 2 scale in float32, then cast.
    Gemma stores `scale - 1` (`norm_offset`), so its scales start at zero.
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.rms_norm_eps
        self.offset = cfg.norm_offset
        self.scale_in_float32 = cfg.norm_scale_in_float32
        init = nnx.initializers.zeros if cfg.norm_offset else nnx.initializers.ones
        self.scale = _param(rngs, shape, axes, cfg.param_dtype, init)

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(-self.scale.ndim, 0))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
        if self.scale_in_float32:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return (self.offset + self.scale[...]).astype(x.dtype) * normed.astype(x.dtype)


RopeTables = tuple[jax.Array, jax.Array]  # (cos, sin), see `rope.rope_tables`
KeysValues = tuple[jax.Array, jax.Array]  # one layer's keys and values of the tokens run, for a KVCache


class Attention(nnx.Module):
    """Self-attention; its window (`AttentionKind`) and RoPE tables come with each call, not with the
    weights, so one set of stacked weights serves local and global layers alike."""

    def __init__(
        self, cfg: ModelConfig, implementation: str, *, rngs: nnx.Rngs, lora: LoraSpec | None = None
    ):
        d, h, kv, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.implementation = implementation  # resolved: "xla", "cudnn" or "splash"
        project = functools.partial(_projection, cfg, rngs, lora)
        self.q_proj = project("q_proj", (d, h, hd), ("embed", "heads", "head_dim"))
        self.k_proj = project("k_proj", (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.v_proj = project("v_proj", (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.o_proj = project("o_proj", (h, hd, d), ("heads", "head_dim", "embed"), inputs=2)
        zeros = nnx.initializers.zeros
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd, zeros)
            self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, zeros)
            self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, zeros)
        if cfg.o_bias:
            self.o_bias = _param(rngs, (d,), ("embed",), pd, zeros)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm((hd,), ("head_dim",), cfg, rngs=rngs)
            self.k_norm = RMSNorm((hd,), ("head_dim",), cfg, rngs=rngs)
        elif cfg.qk_norm == "projection":
            self.q_norm = RMSNorm((h, hd), ("heads", "head_dim"), cfg, rngs=rngs)
            self.k_norm = RMSNorm((kv, hd), ("kv_heads", "head_dim"), cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        rope: RopeTables,
        segment_ids: jax.Array,
        kind: AttentionKind,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KeysValues]:
        """The attention output; with one layer's `cache` (decoding), also these tokens' keys and values.
        `dropout_key` is this layer's LoRA dropout key (None: no dropout)."""
        cfg, dt = self.cfg, self.cfg.dtype
        q = self.q_proj(x, dropout_key)
        k = self.k_proj(x, dropout_key)
        v = self.v_proj(x, dropout_key)
        if cfg.qkv_bias:
            q, k, v = (
                q + self.q_bias[...].astype(dt),
                k + self.k_bias[...].astype(dt),
                v + self.v_bias[...].astype(dt),
            )
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = sharding.constrain(q, ("batch", "sequence", "heads", "head_dim"))
        k = sharding.constrain(k, ("batch", "sequence", "kv_heads", "head_dim"))
        v = sharding.constrain(v, ("batch", "sequence", "kv_heads", "head_dim"))
        options = dict(
            scale=cfg.query_scale, logit_softcap=cfg.attn_logit_softcap, sliding_window=kind.sliding_window
        )
        if cache is None and sharding.context_shards(q.shape[1]) > 1:
            out = context_attention(self.implementation, q, k, v, segment_ids, **options)
        elif cache is None:
            out = attend(self.implementation, q, k, v, segment_ids, **options)
        else:
            out = cached_attention(q, k, v, cache, segment_ids, **options)
        out = checkpoint_name(
            sharding.constrain(out, ("batch", "sequence", "heads", "head_dim")), ATTENTION_OUT
        )
        out = self.o_proj(out, dropout_key)
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out if cache is None else (out, (k, v))


class Block(nnx.Module):
    """Attention then MLP, residual branches normalised before (Llama), after (OLMo 2) or both (Gemma)."""

    def __init__(self, cfg: ModelConfig, attention: str, *, rngs: nnx.Rngs, lora: LoraSpec | None = None):
        def norm() -> RMSNorm:
            return RMSNorm((cfg.hidden_size,), ("norm",), cfg, rngs=rngs)

        before, after = cfg.norm_before_sublayers, cfg.norm_after_sublayers
        self.pre_attn_norm = norm() if before else None
        self.attn = Attention(cfg, attention, rngs=rngs, lora=lora)
        self.post_attn_norm = norm() if after else None
        self.pre_mlp_norm = norm() if before else None
        self.mlp = (MLP if cfg.experts is None else MoE)(cfg, rngs=rngs, lora=lora)
        self.post_mlp_norm = norm() if after else None

    def __call__(
        self,
        x: jax.Array,
        rope: RopeTables,
        segment_ids: jax.Array,
        kind: AttentionKind,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterStats | KeysValues]:
        """(output, the `RouterStats` or with a `cache` this layer's keys and values)."""
        x = checkpoint_name(x, LAYER_INPUT)  # what remat=offload keeps, in host memory
        attn_out = self.attn(_maybe(self.pre_attn_norm, x), rope, segment_ids, kind, cache, dropout_key)
        if cache is not None:
            attn_out, keys_values = attn_out
        x = x + _maybe(self.post_attn_norm, attn_out)
        mlp_out, router_stats = self.mlp(_maybe(self.pre_mlp_norm, x), segment_ids > 0, dropout_key)
        x = sharding.constrain(x + _maybe(self.post_mlp_norm, mlp_out), HIDDEN_AXES)
        return (x, router_stats) if cache is None else (x, keys_values)


def _block_runner(kind: AttentionKind, remat: str):
    """`run(block, x, rope, segment_ids, cache, dropout_key)` for one unrolled layer of `kind`, under its
    remat policy."""

    def run(
        block: Block,
        x: jax.Array,
        rope: RopeTables,
        segment_ids: jax.Array,
        cache: KVCache | None,
        dropout_key: jax.Array | None,
    ):
        return block(x, rope, segment_ids, kind, cache, dropout_key)

    return run if remat == "none" else nnx.remat(run, policy=remat_policy(remat))


def _stacked_blocks(cfg: ModelConfig, attention: str, rngs: nnx.Rngs, lora: LoraSpec | None) -> Block:
    """One Block with `num_layers` independently initialised copies of each parameter, stacked on a
    leading axis named "layers" (never sharded: each device holds its shard of every layer)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, attention, rngs=rngs, lora=lora)

    return create(rngs)


def _maybe(norm: RMSNorm | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


def _layer_key(dropout_key: jax.Array | None, layer: int | jax.Array) -> jax.Array | None:
    """One layer's LoRA dropout key: every layer draws its own masks."""
    return None if dropout_key is None else jax.random.fold_in(dropout_key, layer)


def _layer_cache(cache: KVCache, layer: int | jax.Array) -> KVCache:
    """One layer's view of the decoder's cache."""
    return dataclasses.replace(cache, keys=cache.keys[layer], values=cache.values[layer])


def _write_layer(cache: KVCache, layer: int | jax.Array, keys_values: KeysValues) -> KVCache:
    """The decoder's cache with one layer's new keys and values written at `cache.index`."""
    start = (layer, 0, cache.index, 0, 0)
    keys, values = (x[None].astype(cache.keys.dtype) for x in keys_values)
    return dataclasses.replace(
        cache,
        keys=jax.lax.dynamic_update_slice(cache.keys, keys, start),
        values=jax.lax.dynamic_update_slice(cache.values, values, start),
    )


class Decoder(nnx.Module):
    """`model(input_ids, positions=None, segment_ids=None, dropout_key=None)` -> logits [batch, seq, vocab].

    The attention backend is resolved when the model is built (by `Layout`, for the mesh's devices:
    errors then, not at the first step); each block runs under `jax.checkpoint` with
    `remat_policy(cfg.remat)`.

    With `cfg.scan_layers`, `layers` is one Block whose parameters carry a leading "layers" axis, run
    by `lax.scan`: one layer is compiled, whatever the depth. Otherwise `layers` is a list of blocks,
    unrolled into the program (more compile time, and XLA may schedule across layer boundaries).
    """

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraSpec | None = None, attention: str | None = None
    ):
        """`lora` (a resolved `LoraSpec`) adds LoRA factors to the projections it targets;
        `attention` is the resolved backend (default: `cfg.attention_impl` resolved for the first device)."""
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        attention = attention or resolve_attention_impl(cfg)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, attention, rngs, lora)
        else:
            self.layers = nnx.List(
                [Block(cfg, attention, rngs=rngs, lora=lora) for _ in range(cfg.num_layers)]
            )
        self.final_norm = RMSNorm((cfg.hidden_size,), ("norm",), cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
            )

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
        in_context_order: bool = False,
        router: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache] | tuple[jax.Array, RouterLosses]:
        """The final normalised hidden states [batch, seq, hidden]; `logits_from_hidden` maps them on.

        With a `cache` (decoding: `jsft.generate`), the tokens take slots `cache.index + [0, seq)` and
        also attend to the cached ones; the cache with them written in comes back with the states.
        With a `dropout_key` (training), LoRA factors see dropout on their inputs (rate `lora.dropout`),
        masks drawn from the key folded with the layer index and the projection's name.
        With `router` (no cache), also the routers' `RouterLosses` (zeros for a dense model).
        Under context parallelism the tokens run in `sharding.context_order` and the states come back
        in row order, unless `in_context_order` (the training loss, a sum over tokens, puts its targets
        in that order instead: no exchange of the states between devices).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        if cache is None:  # under context parallelism, tokens in load-balanced order (undone at the end)
            input_ids, positions, segment_ids = map(
                sharding.to_context_order, (input_ids, positions, segment_ids)
            )
        x = self.embed[...][input_ids]
        if self.cfg.scale_embeddings:  # HF rounds sqrt(hidden) to the weights' dtype first
            x = x * np.float32(self.cfg.hidden_size**0.5).astype(x.dtype)
        x = sharding.constrain(x.astype(self.cfg.dtype), HIDDEN_AXES)
        kinds = self.cfg.attention_kinds
        # One (cos, sin) pair per kind, materialised once: left to itself XLA fuses cos and sin into
        # every consumer and recomputes them there (measured: 42 cosines for one layer's fwd+bwd).
        # transformers' "current sequence length" for the scalings that depend on it (dynamic, longrope)
        seq_len = jnp.max(positions) + 1
        ropes = jax.lax.optimization_barrier(
            [
                rope_tables(
                    positions,
                    rope_frequencies(self.cfg.head_dim, k.rope_theta, k.rope_scaling, seq_len),
                    x.dtype,
                    k.rope_scaling.attention_factor if k.rope_scaling else 1.0,
                )
                for k in kinds
            ]
        )
        if cache is not None:
            written = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
            cache = dataclasses.replace(cache, segment_ids=written)
        run_layers = self._scan_layers if self.cfg.scan_layers else self._unrolled_layers
        x, cache, router_stats = run_layers(x, ropes, segment_ids, cache, dropout_key)
        if cache is None:
            hidden = self.final_norm(x)
            hidden = hidden if in_context_order else sharding.from_context_order(hidden)
            losses = router_losses(router_stats, jnp.sum(segment_ids > 0))
            return (hidden, losses) if router else hidden
        return self.final_norm(x), dataclasses.replace(cache, index=cache.index + input_ids.shape[1])

    def _unrolled_layers(
        self,
        x: jax.Array,
        ropes: list[RopeTables],
        segment_ids: jax.Array,
        cache: KVCache | None,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None, RouterStats | None]:
        """The layers one after the other, each its own piece of the program; the router statistics
        stacked over layers (without a cache)."""
        kinds, router_stats = self.cfg.attention_kinds, []
        for i, (block, kind_id) in enumerate(zip(self.layers, self.cfg.layer_kind_ids, strict=True)):
            run = _block_runner(kinds[kind_id], self.cfg.remat)
            layer_cache = None if cache is None else _layer_cache(cache, i)
            x, out = run(block, x, ropes[kind_id], segment_ids, layer_cache, _layer_key(dropout_key, i))
            if cache is None:
                router_stats.append(out)
            else:
                cache = _write_layer(cache, i, out)
        return (
            x,
            cache,
            jax.tree.map(lambda *layers: jnp.stack(layers), *router_stats) if router_stats else None,
        )

    def _scan_layers(
        self,
        x: jax.Array,
        ropes: list[RopeTables],
        segment_ids: jax.Array,
        cache: KVCache | None,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None, RouterStats | None]:
        """All layers as one scan over the stacked parameters; a model with several attention kinds
        picks each layer's branch with `lax.switch` on its kind index (only that branch runs). A cache
        rides in the carry, so each layer writes only its new keys and values into it."""
        graphdef, stacked = nnx.split(self.layers)

        def branch(kind: AttentionKind, rope: RopeTables):
            return lambda state, x, c, key: nnx.merge(graphdef, state)(x, rope, segment_ids, kind, c, key)

        branches = [branch(kind, rope) for kind, rope in zip(self.cfg.attention_kinds, ropes, strict=True)]

        def layer(
            x: jax.Array, state: nnx.State, kind_id: jax.Array, c: KVCache | None, key: jax.Array | None
        ):
            if len(branches) == 1:
                return branches[0](state, x, c, key)
            return jax.lax.switch(kind_id, branches, state, x, c, key)

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(self.cfg.remat))

        def step(carry, xs):
            x, cache = carry
            state, kind_id, index = xs
            if cache is None:
                x, router_stats = layer(x, state, kind_id, None, _layer_key(dropout_key, index))
                return (x, None), router_stats
            x, keys_values = layer(x, state, kind_id, _layer_cache(cache, index), None)
            return (x, _write_layer(cache, index, keys_values)), None

        kind_ids = jnp.asarray(self.cfg.layer_kind_ids, jnp.int32)
        layer_index = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        (x, cache), router_stats = jax.lax.scan(step, (x, cache), (stacked, kind_ids, layer_index))
        return x, cache, router_stats

    def output_kernel(self, compute_dtype: bool = True) -> jax.Array:
        """[hidden, vocab] projection to logits (the transposed embedding when tied), in the compute
        dtype (or as stored: the training loss casts it where it is cheapest, `loss.chunked_loss_sum`).

        Logits are `soft_cap(hidden @ kernel, cfg.final_logit_softcap)`; `logits_from_hidden` does both.
        """
        kernel = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return kernel.astype(self.cfg.dtype) if compute_dtype else kernel

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        logits = sharding.constrain(hidden @ self.output_kernel(), ("batch", "sequence", "vocab"))
        return soft_cap(logits, self.cfg.final_logit_softcap)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        hidden = self.hidden_states(input_ids, positions, segment_ids, dropout_key=dropout_key)
        return self.logits_from_hidden(hidden)
