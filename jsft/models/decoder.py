"""One Flax NNX decoder-only transformer for every supported family (Llama, Mistral, Qwen, OLMo 2, Gemma).

Families differ only through `ModelConfig` fields (norm placement and rounding, q/k norms, biases,
soft-capping, sliding windows), never through copies of this code. Parameters carry logical axis names
(`out_sharding`), which `jsft.sharding` maps onto mesh axes. Projection kernels keep heads as their own
axis ([embed, heads, head_dim]) so tensor parallelism can split heads without reshapes. Activations are
pinned to their logical axes too (`sharding.constrain`), when traced under a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsft import sharding
from jsft.models.attention import (
    apply_rope,
    attend,
    resolve_attention_impl,
    rope_frequencies,
    rope_tables,
    soft_cap,
)
from jsft.models.config import AttentionKind, ModelConfig

_init = nnx.initializers.normal(stddev=0.02)

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}

# What a decoder block saves for the backward pass; everything else is recomputed from its input.
#   full: nothing (least memory, about one more forward pass of compute);
#   minimal: the projections' outputs (matmuls without batch dimensions; MaxText's "minimal"), so the
#     backward recomputes norms, RoPE, activations and the attention core (its [t, t] scores included);
#   dots_saveable: every matmul's output, attention scores included (most memory of the three).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
HIDDEN_AXES = ("batch", "sequence", "activation_embed")


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=_init) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


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


RopeTables = tuple[jax.Array, jax.Array]  # (cos, sin), see `attention.rope_tables`


class Attention(nnx.Module):
    """Self-attention; its window (`AttentionKind`) and RoPE tables come with each call, not with the
    weights, so one set of stacked weights serves local and global layers alike."""

    def __init__(self, cfg: ModelConfig, implementation: str, *, rngs: nnx.Rngs):
        d, h, kv, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.implementation = implementation  # resolved: "xla", "cudnn" or "splash"
        self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd)
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
        self, x: jax.Array, rope: RopeTables, segment_ids: jax.Array, kind: AttentionKind
    ) -> jax.Array:
        cfg, dt = self.cfg, self.cfg.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(dt))
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
        out = attend(
            self.implementation,
            q,
            k,
            v,
            segment_ids,
            scale=cfg.query_scale,
            logit_softcap=cfg.attn_logit_softcap,
            sliding_window=kind.sliding_window,
        )
        out = sharding.constrain(out, ("batch", "sequence", "heads", "head_dim"))
        out = jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(dt))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.cfg = cfg
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.cfg.dtype
        gate = ACTIVATIONS[self.cfg.hidden_act](x @ self.gate_proj[...].astype(dt))
        hidden = sharding.constrain(gate * (x @ self.up_proj[...].astype(dt)), ("batch", "sequence", "mlp"))
        return hidden @ self.down_proj[...].astype(dt)


class Block(nnx.Module):
    """Attention then MLP, residual branches normalised before (Llama), after (OLMo 2) or both (Gemma)."""

    def __init__(self, cfg: ModelConfig, attention: str, *, rngs: nnx.Rngs):
        def norm() -> RMSNorm:
            return RMSNorm((cfg.hidden_size,), ("norm",), cfg, rngs=rngs)

        before, after = cfg.norm_before_sublayers, cfg.norm_after_sublayers
        self.pre_attn_norm = norm() if before else None
        self.attn = Attention(cfg, attention, rngs=rngs)
        self.post_attn_norm = norm() if after else None
        self.pre_mlp_norm = norm() if before else None
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_mlp_norm = norm() if after else None

    def __call__(
        self, x: jax.Array, rope: RopeTables, segment_ids: jax.Array, kind: AttentionKind
    ) -> jax.Array:
        attn_out = self.attn(_maybe(self.pre_attn_norm, x), rope, segment_ids, kind)
        x = x + _maybe(self.post_attn_norm, attn_out)
        x = x + _maybe(self.post_mlp_norm, self.mlp(_maybe(self.pre_mlp_norm, x)))
        return sharding.constrain(x, HIDDEN_AXES)


def _block_runner(kind: AttentionKind, remat: str):
    """`run(block, x, rope, segment_ids)` for one unrolled layer of `kind`, under its remat policy."""

    def run(block: Block, x: jax.Array, rope: RopeTables, segment_ids: jax.Array) -> jax.Array:
        return block(x, rope, segment_ids, kind)

    return run if remat == "none" else nnx.remat(run, policy=REMAT_POLICIES[remat])


def _stacked_blocks(cfg: ModelConfig, attention: str, rngs: nnx.Rngs) -> Block:
    """One Block with `num_layers` independently initialised copies of each parameter, stacked on a
    leading axis named "layers" (never sharded: each device holds its shard of every layer)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, attention, rngs=rngs)

    return create(rngs)


def _maybe(norm: RMSNorm | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


class Decoder(nnx.Module):
    """`model(input_ids, positions=None, segment_ids=None)` -> logits [batch, seq, vocab].

    The attention backend is resolved for the first device when the model is built (errors then, not
    at the first step); each block runs under `jax.checkpoint` with `REMAT_POLICIES[cfg.remat]`.

    With `cfg.scan_layers`, `layers` is one Block whose parameters carry a leading "layers" axis, run
    by `lax.scan`: one layer is compiled, whatever the depth. Otherwise `layers` is a list of blocks,
    unrolled into the program (more compile time, and XLA may schedule across layer boundaries).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        attention = resolve_attention_impl(cfg)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, attention, rngs)
        else:
            self.layers = nnx.List([Block(cfg, attention, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm((cfg.hidden_size,), ("norm",), cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
            )

    def hidden_states(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """The final normalised hidden states [batch, seq, hidden]; `logits_from_hidden` maps them on."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        x = self.embed[...][input_ids]
        if self.cfg.scale_embeddings:  # HF rounds sqrt(hidden) to the weights' dtype first
            x = x * np.float32(self.cfg.hidden_size**0.5).astype(x.dtype)
        x = sharding.constrain(x.astype(self.cfg.dtype), HIDDEN_AXES)
        kinds = self.cfg.attention_kinds
        # One (cos, sin) pair per kind, materialised once: left to itself XLA fuses cos and sin into
        # every consumer and recomputes them there (measured: 42 cosines for one layer's fwd+bwd).
        ropes = jax.lax.optimization_barrier(
            [
                rope_tables(
                    positions, rope_frequencies(self.cfg.head_dim, k.rope_theta, k.rope_scaling), x.dtype
                )
                for k in kinds
            ]
        )
        if self.cfg.scan_layers:
            x = self._scan_layers(x, ropes, segment_ids)
        else:
            for block, kind_id in zip(self.layers, self.cfg.layer_kind_ids, strict=True):
                run = _block_runner(kinds[kind_id], self.cfg.remat)
                x = run(block, x, ropes[kind_id], segment_ids)
        return self.final_norm(x)

    def _scan_layers(self, x: jax.Array, ropes: list[RopeTables], segment_ids: jax.Array) -> jax.Array:
        """All layers as one scan over the stacked parameters; a model with several attention kinds
        picks each layer's branch with `lax.switch` on its kind index (only that branch runs)."""
        graphdef, stacked = nnx.split(self.layers)

        def branch(kind: AttentionKind, rope: RopeTables):
            return lambda state, x: nnx.merge(graphdef, state)(x, rope, segment_ids, kind)

        branches = [branch(kind, rope) for kind, rope in zip(self.cfg.attention_kinds, ropes, strict=True)]

        def layer(x: jax.Array, state: nnx.State, kind_id: jax.Array) -> jax.Array:
            if len(branches) == 1:
                return branches[0](state, x)
            return jax.lax.switch(kind_id, branches, state, x)

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat])
        kind_ids = jnp.asarray(self.cfg.layer_kind_ids, jnp.int32)
        x, _ = jax.lax.scan(lambda x, xs: (layer(x, *xs), None), x, (stacked, kind_ids))
        return x

    def output_kernel(self) -> jax.Array:
        """[hidden, vocab] projection to logits (the transposed embedding when tied).

        Logits are `soft_cap(hidden @ kernel, cfg.final_logit_softcap)`; `logits_from_hidden` does both.
        """
        kernel = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return kernel.astype(self.cfg.dtype)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        logits = sharding.constrain(hidden @ self.output_kernel(), ("batch", "sequence", "vocab"))
        return soft_cap(logits, self.cfg.final_logit_softcap)

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        return self.logits_from_hidden(self.hidden_states(input_ids, positions, segment_ids))
