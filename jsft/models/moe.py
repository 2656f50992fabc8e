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


class MLP(nnx.Module):
    """gate, up and down projections (LoRA where the spec targets them); no router statistics."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraSpec | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        project = functools.partial(
            Projection, inputs=1, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, lora=lora
        )
        self.gate_proj = project("gate_proj", (d, f), ("embed", "mlp"))
        self.up_proj = project("up_proj", (d, f), ("embed", "mlp"))
        self.down_proj = project("down_proj", (f, d), ("mlp", "embed"))

    def __call__(
        self, x: jax.Array, real: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        gate = ACTIVATIONS[self.cfg.hidden_act](self.gate_proj(x, dropout_key))
        hidden = sharding.constrain(gate * self.up_proj(x, dropout_key), ("batch", "sequence", "mlp"))
        return self.down_proj(hidden, dropout_key), jnp.zeros((2, 0), jnp.float32)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(kernel_init(rngs.params(), shape, dtype), out_sharding=axes)


class MoE(nnx.Module):
    """`moe(x, real, dropout_key)` -> (output like x, router statistics [2, experts] of the `real` tokens).

    The router is [embed, experts]; the experts' kernels are stacked on a leading "expert" axis:
    gate and up [expert, embed, mlp], down [expert, mlp, embed]. The statistics (assignments per expert,
    summed router probability per expert, over the real tokens) are what `load_balancing_loss` needs.
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
    ) -> tuple[jax.Array, jax.Array]:
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
            out_specs=(P(*rows, None), P()),
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
) -> tuple[jax.Array, jax.Array]:
    """`MoE` on these tokens: router, top k, the experts by grouped matmuls, statistics; `row_axes` and
    `width_axes` are the mesh axes the tokens and the experts' width are split over (to sum over).

    With `expert_axis`, `gate`, `up` and `down` are this device's experts along the mesh's expert axis:
    the tokens of every device of that axis are gathered, this device runs its experts' share of their
    assignments, and each device gets back the sum over the axis for its own tokens (a gather and a
    reduce-scatter: dropless without a ragged all-to-all, for moving every token over the axis)."""
    dt, k, count = cfg.dtype, cfg.experts.per_token, cfg.experts.count
    tokens = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax((tokens @ router.astype(dt)).astype(jnp.float32), axis=-1)
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
    return combined.reshape(x.shape), _router_statistics(flat, probs, real.reshape(-1), k, row_axes)


def _router_statistics(
    chosen: jax.Array, probs: jax.Array, real: jax.Array, k: int, row_axes: tuple[str, ...]
) -> jax.Array:
    """[2, experts]: assignments per expert and summed router probability per expert, over the `real`
    tokens of every device that splits the rows (`row_axes`)."""
    mask = real.astype(jnp.float32)
    counts = jnp.zeros(probs.shape[-1], jnp.float32).at[chosen].add(jnp.repeat(mask, k))
    stats = jnp.stack([counts, jnp.sum(probs * mask[:, None], axis=0)])
    return jax.lax.psum(stats, row_axes) if row_axes else stats


def load_balancing_loss(stats: jax.Array, segment_ids: jax.Array, num_layers: int) -> jax.Array:
    """transformers' `load_balancing_loss_func` with an attention mask, from the layers' summed router
    statistics [2, experts] of the real tokens (segment id > 0): experts x sum over experts of (share of
    assignments) x (mean router probability), both over all layers' real tokens at once. 0 for a dense
    model (no experts)."""
    rows = jnp.maximum(num_layers * jnp.sum(segment_ids > 0).astype(jnp.float32), 1.0)
    counts, probs = stats
    return stats.shape[-1] * jnp.sum((counts / rows) * (probs / rows))
