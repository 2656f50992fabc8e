"""The decoder's MLPs: the dense SwiGLU `MLP`, and the mixture of experts (`MoE`) of Qwen3-MoE, Mixtral
and OLMoE with its router's load-balancing loss. Both take (x, real-token mask, dropout key) and return
(output, router statistics), so a block runs either the same way.

Routing is transformers': softmax over the router logits in float32, the top k experts, their
probabilities renormalised to sum to 1 where the family does (`Experts.norm_topk_prob`). Dispatch is
dropless: every (token, expert) assignment is computed, none is dropped for capacity. The assignments are
sorted by expert so each expert's tokens are contiguous, one grouped matmul (`jax.lax.ragged_dot`) per
kernel runs all experts, and the outputs go back to token order to be summed with the router weights.
Accelerators run `ragged_dot` as a grouped matmul; XLA:CPU lowers it to a dense product with every
expert (E times the FLOPs), which is fine for tests, not for speed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jsft import sharding
from jsft.errors import UnsupportedModelError
from jsft.lora.spec import LoraSpec
from jsft.models.config import ModelConfig
from jsft.models.projection import Projection, kernel_init

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
EXPERT_KERNELS = ("gate_proj", "up_proj", "down_proj")


class RouterStats(NamedTuple):
    """One layer's routing over its real tokens (summed over every device that splits the rows); the
    decoder stacks them over layers. A dense MLP's are empty (no experts)."""

    assigned: jax.Array  # [experts] (token, expert) assignments per expert
    probability: jax.Array  # [experts] router probability summed per expert
    z: jax.Array  # [] log(sum exp(router logits))^2 summed over tokens (ST-MoE's router z-loss)

    @classmethod
    def none(cls) -> RouterStats:
        empty = jnp.zeros((0,), jnp.float32)
        return cls(empty, empty, jnp.zeros((), jnp.float32))


class RouterLosses(NamedTuple):
    """What a batch's routing costs and how it spreads, from the layers' `RouterStats`; all 0 for a dense
    model. The losses are scalars; the loads are each expert's share of a layer's assignments times the
    number of experts (1 everywhere = perfectly balanced), the largest and smallest over all layers."""

    aux: jax.Array  # transformers' load-balancing loss (before router_aux_loss_coef)
    z: jax.Array  # router z-loss: mean over layers and real tokens of log(sum exp(router logits))^2
    load_max: jax.Array  # the most loaded expert of any layer (E/k: one expert takes every token)
    load_min: jax.Array  # the least loaded (0: an expert of some layer got no token)


class MLP(nnx.Module):
    """gate, up and down projections (LoRA where the spec targets them); no router statistics."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraSpec | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        project = functools.partial(
            Projection, inputs=1, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, lora=lora
        )
        self.gate_proj = project("gate_proj", (d, f), ("embed", "mlp_kernel"))
        self.up_proj = project("up_proj", (d, f), ("embed", "mlp_kernel"))
        self.down_proj = project("down_proj", (f, d), ("mlp_kernel", "embed"))

    def __call__(
        self, x: jax.Array, real: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        gate = ACTIVATIONS[self.cfg.hidden_act](self.gate_proj(x, dropout_key))
        hidden = sharding.constrain(gate * self.up_proj(x, dropout_key), ("batch", "sequence", "mlp"))
        return self.down_proj(hidden, dropout_key), RouterStats.none()


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(kernel_init(rngs.params(), shape, dtype), out_sharding=axes)


class MoE(nnx.Module):
    """`moe(x, real, dropout_key)` -> (output like x, `RouterStats` of the `real` tokens).

    The router is [embed, experts]; the experts' kernels are stacked on a leading "expert" axis:
    gate and up [expert, embed, mlp], down [expert, mlp, embed].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraSpec | None = None):
        experts = cfg.experts
        adapted = [name for name in EXPERT_KERNELS if lora is not None and name in lora.targets]
        if adapted:
            raise UnsupportedModelError(
                f"lora.targets names {', '.join(adapted)}: on a {cfg.model_type} model these are experts, "
                "which jsft does not adapt; set lora.targets=q_proj,k_proj,v_proj,o_proj"
            )
        d, f, e, pd = cfg.hidden_size, experts.intermediate_size, experts.count, cfg.param_dtype
        self.cfg = cfg
        self.router = _param(rngs, (d, e), ("embed", None), pd)
        self.gate_proj = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
        self.up_proj = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
        self.down_proj = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd)

    def __call__(
        self, x: jax.Array, real: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """`dropout_key` is unused: the experts have no LoRA factors.

        Under a mesh every device routes and dispatches only its own tokens (`jax.shard_map` over the
        rows' axes): sorting the whole batch instead would gather every token onto every device and
        repeat all experts' work there. The experts' kernels come whole but for their width, which stays
        split over the tensor axis (partial outputs summed over it). With an expert axis that divides
        the experts and splits the rows (expert parallelism), each device holds its share of the
        experts and runs every assignment to them (`_routed`'s `expert_axis`)."""
        kernels = (self.router[...], self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return _routed(self.cfg, x, real, *kernels)
        rows = tuple(sharding.logical_to_spec(("batch", "sequence"), x.shape[:2], mesh))
        width = sharding.logical_to_spec(("mlp",), (self.cfg.experts.intermediate_size,), mesh)[0]
        split = tuple(a for axes in rows if axes for a in ((axes,) if isinstance(axes, str) else axes))
        parallel = "expert" in split and self.cfg.experts.count % mesh.shape["expert"] == 0
        experts = "expert" if parallel else None
        local = functools.partial(_routed, self.cfg, row_axes=split, width_axes=width, expert_axis=parallel)
        return jax.shard_map(
            local,
            in_specs=(
                P(*rows, None),
                P(*rows),
                P(),
                P(experts, None, width),
                P(experts, None, width),
                P(experts, width),
            ),
            out_specs=(P(*rows, None), RouterStats(P(), P(), P())),
            check_vma=False,
        )(x, real, *kernels)


def _routed(
    cfg: ModelConfig,
    x: jax.Array,
    real: jax.Array,
    router: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    row_axes: tuple[str, ...] = (),
    width_axes: str | tuple[str, ...] | None = None,
    expert_axis: bool = False,
) -> tuple[jax.Array, RouterStats]:
    """`MoE` on these tokens: router, top k, the experts by grouped matmuls, statistics; `row_axes` and
    `width_axes` are the mesh axes the tokens and the experts' width are split over (to sum over).

    With `expert_axis`, `gate`, `up` and `down` are this device's experts along the mesh's expert axis:
    the tokens of every device of that axis are gathered, this device runs its experts' share of their
    assignments, and each device gets back the sum over the axis for its own tokens (a gather and a
    reduce-scatter: dropless without a ragged all-to-all, for moving every token over the axis)."""
    dt, k, count = cfg.dtype, cfg.experts.per_token, cfg.experts.count
    tokens = x.reshape(-1, x.shape[-1])
    logits = (tokens @ router.astype(dt)).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, chosen = jax.lax.top_k(probs, k)  # [tokens, k]
    if cfg.experts.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = chosen.reshape(-1)
    held, first = count, 0  # the experts this device runs: [first, first + held)
    if expert_axis:
        tokens, chosen, weights = (
            jax.lax.all_gather(a, "expert", tiled=True) for a in (tokens, chosen, weights)
        )
        held = gate.shape[0]
        first = jax.lax.axis_index("expert") * held
    mine = (chosen >= first) & (chosen < first + held)
    # Sorted by expert (stable: a token's assignments keep their order), each expert's rows contiguous;
    # other devices' assignments sort last, outside every group, where ragged_dot gives zeros.
    expert_of = jnp.where(mine, chosen - first, held).reshape(-1)
    order = jnp.argsort(expert_of, stable=True)
    group_sizes = jnp.bincount(expert_of, length=held + 1)[:held].astype(jnp.int32)
    rows = tokens[order // k]

    def grouped(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.ragged_dot(inputs, kernel.astype(dt), group_sizes)

    hidden = ACTIVATIONS[cfg.hidden_act](grouped(rows, gate)) * grouped(rows, up)
    out = grouped(hidden, down)[jnp.argsort(order)].reshape(*chosen.shape, -1)
    combined = jnp.einsum("tkd,tk->td", out, jnp.where(mine, weights, 0).astype(dt))
    if width_axes:
        combined = jax.lax.psum(combined, width_axes)
    if expert_axis:
        combined = jax.lax.psum_scatter(combined, "expert", scatter_dimension=0, tiled=True)
    stats = _router_statistics(flat, logits, probs, real.reshape(-1), k)
    return combined.reshape(x.shape), jax.lax.psum(stats, row_axes) if row_axes else stats


def _router_statistics(
    chosen: jax.Array, logits: jax.Array, probs: jax.Array, real: jax.Array, k: int
) -> RouterStats:
    """These tokens' `RouterStats`, over the `real` ones."""
    mask = real.astype(jnp.float32)
    assigned = jnp.zeros(probs.shape[-1], jnp.float32).at[chosen].add(jnp.repeat(mask, k))
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * mask)
    return RouterStats(assigned, jnp.sum(probs * mask[:, None], axis=0), z)


def router_losses(layers: RouterStats, real_tokens: jax.Array) -> RouterLosses:
    """The batch's `RouterLosses` from every layer's `RouterStats` (stacked: [layers, experts]) and its
    number of real tokens (segment id > 0, as the statistics count them).

    The aux loss is transformers' `load_balancing_loss_func` with an attention mask: experts x the sum
    over experts of (share of assignments) x (mean router probability), both over all layers' real
    tokens at once. The z-loss is ST-MoE's, averaged the same way. 0 throughout for a dense model."""
    layers_count, experts = layers.assigned.shape
    if experts == 0:
        zero = jnp.zeros((), jnp.float32)
        return RouterLosses(zero, zero, zero, zero)
    tokens = jnp.maximum(real_tokens.astype(jnp.float32), 1.0)
    rows = layers_count * tokens
    assigned, probability = (jnp.sum(a, axis=0) for a in (layers.assigned, layers.probability))
    aux = experts * jnp.sum((assigned / rows) * (probability / rows))
    per_layer = jnp.maximum(jnp.sum(layers.assigned, axis=-1, keepdims=True), 1.0)
    load = experts * layers.assigned / per_layer
    return RouterLosses(aux, jnp.sum(layers.z) / rows, jnp.max(load), jnp.min(load))
