"""The jitted train and eval steps: pure functions of (`TrainState`, batch) pytrees with explicit shardings.

`jsft.trainer.Trainer` builds them once per run; nothing else should call the builders here.
Gradients are accumulated over micro-batches with a scan inside the step. With `loss_reduction="mean"`
the summed token losses of the whole global batch are divided once by its trained-token count, so
neither the number of micro-batches nor the sharding changes the gradient. A step whose loss or
gradient is not finite leaves parameters and optimizer state untouched and lengthens the streak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from jsft import loss, sharding
from jsft.errors import ConfigError
from jsft.lora import params as lora_params
from jsft.lora.spec import LoraSpec
from jsft.models import Layout, Params
from jsft.models.moe import RouterLosses

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")
# A mixture of experts' step metrics: `RouterLosses` field -> metrics key
ROUTER_METRICS = {
    "aux": "aux_loss",
    "z": "router_z_loss",
    "load_max": "expert_load_max",
    "load_min": "expert_load_min",
}


@struct.dataclass
class TrainState:
    """What a run carries from step to step; init, the step, save and restore all use this one type.

    `params` is what the optimizer trains: all weights, or with LoRA the low-rank factors (and any
    `lora.also_train` weights). `base` holds LoRA's frozen weights (read from the model folder, never
    checkpointed; in the compute dtype, or quantized) and is None otherwise: it gets no gradient.
    `nonfinite_streak` counts the consecutive steps skipped for a non-finite loss, gradient or update.
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array
    nonfinite_streak: jax.Array
    base: Params | None = None


def _opt_state_shardings(
    abstract_opt_state,
    param_shardings: dict[str, NamedSharding],
    param_shapes: dict[str, jax.ShapeDtypeStruct],
    mesh: Mesh,
):
    """Optimizer moments are sharded like their parameter; scalars (step counts) and Adafactor's factored
    statistics (a matrix's row and column means, shaped unlike it) are replicated."""

    def one(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in param_shardings and leaf.shape == param_shapes[names[-1]].shape:
            return param_shardings[names[-1]]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def trainable_shapes(layout: Layout, lora: LoraSpec | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of what the optimizer trains: `layout.trainable` (all parameters without LoRA).

    `lora`, when `layout` was built without it (a checkpoint's saved layout), adds its factors."""
    if lora is not None and layout.lora is None:
        layout = Layout(layout.cfg, lora, layout.device)
    return {name: layout.shapes[name] for name in sorted(layout.trainable)}


def state_shardings(layout: Layout, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A `TrainState` of shardings: parameters by their logical axes, moments like their parameter;
    a quantized frozen kernel's codes and scales split like the kernel where their sizes allow."""
    all_shardings = layout.shardings(mesh)
    params = {name: all_shardings[name] for name in sorted(layout.trainable)}
    shapes = trainable_shapes(layout)
    abstract_opt = jax.eval_shape(optimizer.init, shapes)
    return TrainState(
        params=params,
        opt_state=_opt_state_shardings(abstract_opt, params, shapes, mesh),
        step=sharding.replicated(mesh),
        nonfinite_streak=sharding.replicated(mesh),
        base=lora_params.base_shardings(layout, mesh) if layout.lora else None,
    )


def init_state(
    params: Params, optimizer: optax.GradientTransformation, shardings: TrainState, base: Params | None = None
) -> TrainState:
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    # two distinct arrays (the step donates its state, and one buffer may not be donated twice), placed
    # as the step returns them: unplaced, the first step compiled once for them and again for its output
    return TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
        nonfinite_streak=jax.device_put(jnp.zeros((), jnp.int32), shardings.nonfinite_streak),
        base=base,
    )


def model_params(params: Params, base: Params | None) -> Params:
    """The weights the model runs with: `params`, or with LoRA the frozen base beside the trainable
    parameters. The base is never differentiated (only `params` is), so it gets no gradient."""
    if base is None:
        return params
    return {**jax.lax.stop_gradient(base), **params}


def _loss_sum(
    layout: Layout, params: Params, batch: Batch, z_loss: float = 0.0, dropout_key: jax.Array | None = None
) -> jax.Array:
    """The summed token losses (what evaluation reports)."""
    return _loss_terms(layout, params, batch, z_loss, dropout_key)[0]


def _loss_terms(
    layout: Layout, params: Params, batch: Batch, z_loss: float = 0.0, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, RouterLosses]:
    """(summed token losses, the routers' losses and loads: zeros without experts; `_with_router_losses`)."""
    model = layout.merge(params)
    hidden, router = model.hidden_states(
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        dropout_key=dropout_key,
        in_context_order=True,
        router=True,
    )
    token_sum = loss.chunked_loss_sum(
        hidden,
        model.output_kernel(compute_dtype=False),
        sharding.to_context_order(batch["target_ids"]),
        sharding.to_context_order(batch["loss_mask"]),
        z_loss=z_loss,
        softcap=model.cfg.final_logit_softcap,
        dtype=model.cfg.dtype,
    )
    return token_sum, router


class RouterWeights(NamedTuple):
    """The weights of a mixture of experts' router losses in the training loss."""

    aux: float = 0.0  # the load-balancing loss's (transformers' router_aux_loss_coef)
    z: float = 0.0  # the router z-loss's (ST-MoE; OLMoE trained with 0.001)

    @classmethod
    def of(cls, layout: Layout, aux: float = -1.0, z: float = 0.0) -> RouterWeights:
        """`aux` below 0: config.json's `router_aux_loss_coef`. A dense model has no router to weigh:
        asking to weigh one is a config error (the train.* keys named), not silently nothing."""
        if layout.cfg.experts is None:
            if aux >= 0 or z > 0:
                raise ConfigError(
                    f"train.router_aux_loss_coef={aux:g} / train.router_z_loss={z:g}: the model "
                    f"({layout.cfg.model_type}) has no experts; leave them at -1 and 0"
                )
            return cls()
        return cls(layout.cfg.experts.router_aux_loss_coef if aux < 0 else aux, z)


def _with_router_losses(
    token_sum: jax.Array, router: RouterLosses, weights: RouterWeights, loss_mask: jax.Array
) -> jax.Array:
    """The training loss of a micro-batch: transformers adds `router_aux_loss_coef` x the aux loss to the
    mean token loss; jsft sums token losses and divides by the global batch's trained tokens once, so the
    router losses enter the sum times the micro-batch's trained tokens. With `loss_reduction=mean` and one
    micro-batch that is transformers' total exactly (with several, the router losses' token-weighted
    mean); with `sum` they keep the same weight against the token losses."""
    router_loss = weights.aux * router.aux + weights.z * router.z
    return token_sum + router_loss * jnp.sum(loss_mask)


def _under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Traces `fn` under the mesh, so the model's activation sharding constraints take effect."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def _summed_gradients(
    layout: Layout, mesh: Mesh, grad_accum_steps: int, z_loss: float, router_weights: RouterWeights, seed: int
) -> Callable[[TrainState, Batch], tuple[Params, jax.Array, RouterLosses]]:
    """`summed(state, batch)` -> (gradient, loss) summed over the batch's tokens, one micro-batch at a
    time in a scan, and the micro-batches' mean `RouterLosses` (`_with_router_losses`). With
    `lora.dropout`, each micro-batch draws its masks from (seed, step, micro-batch)."""
    batch_sharding = sharding.batch_sharding(mesh)
    micro_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))
    dropout = layout.lora is not None and layout.lora.dropout > 0

    def micro_batches(x: jax.Array) -> jax.Array:
        # Row r goes to micro-batch r % A, so each micro-batch is spread evenly over the data shards.
        x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

    def summed(state: TrainState, batch: Batch) -> tuple[Params, jax.Array]:
        params, base = state.params, state.base
        step_key = jax.random.fold_in(jax.random.key(seed), state.step) if dropout else None

        def micro_loss(p: Params, micro: Batch, key: jax.Array | None) -> tuple[jax.Array, RouterLosses]:
            token_sum, router = _loss_terms(layout, model_params(p, base), micro, z_loss, key)
            return _with_router_losses(token_sum, router, router_weights, micro["loss_mask"]), router

        def accumulate(carry, xs):
            grads_sum, loss_sum, router_sum = carry
            micro, index = xs
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            (value, router), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, micro, key)
            router_sum = jax.tree.map(jnp.add, router_sum, router)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + value, router_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        no_router = RouterLosses(*[jnp.zeros((), jnp.float32)] * len(RouterLosses._fields))
        carry = (zeros, jnp.zeros((), jnp.float32), no_router)
        micro = (jax.tree.map(micro_batches, batch), jnp.arange(grad_accum_steps))
        (grads_sum, loss_sum, router_sum), _ = jax.lax.scan(accumulate, carry, micro)
        return grads_sum, loss_sum, jax.tree.map(lambda x: x / grad_accum_steps, router_sum)

    return summed


def make_train_step(
    layout: Layout,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    mesh: Mesh,
    *,
    grad_accum_steps: int,
    loss_reduction: str,
    z_loss: float = 0.0,
    router_weights: RouterWeights | None = None,
    seed: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The optimizer's update from the batch's gradient (see `_summed_gradients`), kept only when the
    loss, the gradient and the updated parameters are all finite (an update can overflow, or a NaN learning
    rate poison, parameters whose gradient was fine: the last good checkpoint must never hold them).
    `router_weights` None: `RouterWeights.of(layout)`, config.json's."""
    router_weights = router_weights or RouterWeights.of(layout)
    summed_gradients = _summed_gradients(layout, mesh, grad_accum_steps, z_loss, router_weights, seed)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params = state.params
        trained_tokens = jnp.sum(batch["loss_mask"])
        grads_sum, loss_sum, router = summed_gradients(state, batch)
        tokens = jnp.maximum(trained_tokens, 1).astype(jnp.float32)
        scale = 1.0 / tokens if loss_reduction == "mean" else 1.0
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads_sum, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        # A finite gradient can still give a non-finite update (a NaN step size, an overflow); a finite
        # update of finite parameters gives finite ones, so its norm is the one more check needed.
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))

        def keep_if_not_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            params=keep_if_not_finite(optax.apply_updates(params, updates), params),
            opt_state=keep_if_not_finite(opt_state, state.opt_state),
            step=state.step + 1,
            nonfinite_streak=streak,
        )
        metrics = {
            # mean token loss (plus z-loss and the weighted router losses), whatever the reduction optimised
            "loss": loss_sum / tokens,
            "grad_norm": grad_norm,
            "trained_tokens": trained_tokens,
            "skipped": jnp.logical_not(finite),
            "nonfinite_streak": streak,
        }
        if layout.cfg.experts:  # the micro-batches' means, before the router weights
            metrics |= {ROUTER_METRICS[k]: v for k, v in router._asdict().items()}
        return new_state, metrics

    return jax.jit(
        _under_mesh(train_step, mesh),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(
    layout: Layout, shardings: TrainState, mesh: Mesh
) -> Callable[[Params, Params | None, Batch], dict]:
    """`eval_step(state.params, state.base, batch)` -> summed loss and trained tokens."""

    def eval_step(params: Params, base: Params | None, batch: Batch) -> dict:
        loss_sum = _loss_sum(layout, model_params(params, base), batch)
        return {"loss_sum": loss_sum, "trained_tokens": jnp.sum(batch["loss_mask"])}

    return jax.jit(
        _under_mesh(eval_step, mesh),
        in_shardings=(shardings.params, shardings.base, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
