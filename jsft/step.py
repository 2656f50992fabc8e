"""The jitted train and eval steps: pure functions of (state, batch) pytrees with explicit shardings.

`state` is {"params": {name: array}, "opt_state": optax state, "step": int32, "nonfinite_streak": int32}
where "params" is what the optimizer trains: all weights, or with LoRA the low-rank factors, the frozen
weights then riding along as "base".
Gradients are accumulated over micro-batches with a scan inside the step. With `loss_reduction="mean"`
the summed token losses of the whole global batch are divided once by its trained-token count, so
neither the number of micro-batches nor the sharding changes the gradient. A step whose loss or
gradient is not finite leaves parameters and optimizer state untouched and lengthens the streak.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jsft import loss, sharding
from jsft.lora import LoraSpec
from jsft.models import Layout, Params

State = dict
Batch = dict[str, jax.Array]


def _opt_state_shardings(abstract_opt_state, param_shardings: dict[str, NamedSharding], mesh: Mesh):
    """Optimizer moments are sharded like their parameter; scalars (step counts) are replicated."""

    def one(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in param_shardings and leaf.ndim > 0:
            return param_shardings[names[-1]]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def trainable_shapes(layout: Layout, lora: LoraSpec | None) -> dict[str, jax.ShapeDtypeStruct]:
    return lora.shapes(layout) if lora else layout.shapes


def state_shardings(
    layout: Layout, optimizer: optax.GradientTransformation, mesh: Mesh, lora: LoraSpec | None = None
) -> State:
    params = lora.shardings(layout, mesh) if lora else layout.shardings(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, trainable_shapes(layout, lora))
    out = {
        "params": params,
        "opt_state": _opt_state_shardings(abstract_opt, params, mesh),
        "step": sharding.replicated(mesh),
        "nonfinite_streak": sharding.replicated(mesh),
    }
    if lora:
        out["base"] = layout.shardings(mesh)
    return out


def init_state(
    params: Params, optimizer: optax.GradientTransformation, shardings: State, base: Params | None = None
) -> State:
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    # two distinct arrays: the step donates its state, and one buffer may not be donated twice
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.zeros((), jnp.int32),
        "nonfinite_streak": jnp.zeros((), jnp.int32),
    }
    if base is not None:
        state["base"] = base
    return state


def model_params(params: Params, base: Params | None, lora: LoraSpec | None) -> Params:
    """The weights the model runs with: `params` itself, or the base with the LoRA factors folded in."""
    return lora.merge(base, params) if lora else params


def _loss_sum(layout: Layout, params: Params, batch: Batch, z_loss: float = 0.0) -> jax.Array:
    model = layout.merge(params)
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    kernel = model.output_kernel()
    return loss.chunked_loss_sum(
        hidden,
        kernel,
        batch["target_ids"],
        batch["loss_mask"],
        z_loss=z_loss,
        softcap=model.cfg.final_logit_softcap,
    )


def _under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Traces `fn` under the mesh, so the model's activation sharding constraints take effect."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def make_train_step(
    layout: Layout,
    optimizer: optax.GradientTransformation,
    shardings: State,
    mesh: Mesh,
    *,
    grad_accum_steps: int,
    loss_reduction: str,
    z_loss: float = 0.0,
    lora: LoraSpec | None = None,
) -> Callable[[State, Batch], tuple[State, dict]]:
    batch_sharding = sharding.batch_sharding(mesh)

    def micro_batches(x: jax.Array) -> jax.Array:
        # Row r goes to micro-batch r % A, so each micro-batch is spread evenly over the data shards.
        rows = x.shape[0]
        x = x.reshape(rows // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))
        )

    def train_step(state: State, batch: Batch) -> tuple[State, dict]:
        params, base = state["params"], state.get("base")
        trained_tokens = jnp.sum(batch["loss_mask"])

        def micro_loss(p: Params, micro: Batch) -> jax.Array:
            return _loss_sum(layout, model_params(p, base, lora), micro, z_loss)

        def accumulate(carry, micro):
            grads_sum, loss_sum = carry
            value, grads = jax.value_and_grad(micro_loss)(params, micro)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + value), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        carry = (zeros, jnp.zeros((), jnp.float32))
        (grads_sum, loss_sum), _ = jax.lax.scan(accumulate, carry, jax.tree.map(micro_batches, batch))
        tokens = jnp.maximum(trained_tokens, 1).astype(jnp.float32)
        scale = 1.0 / tokens if loss_reduction == "mean" else 1.0
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads_sum, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

        def keep_if_not_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = {
            "params": keep_if_not_finite(optax.apply_updates(params, updates), params),
            "opt_state": keep_if_not_finite(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
        }
        if base is not None:
            new_state["base"] = base
        metrics = {
            "loss": loss_sum / tokens,  # mean token loss (plus z-loss), whatever the reduction optimised
            "grad_norm": grad_norm,
            "trained_tokens": trained_tokens,
            "skipped": jnp.logical_not(finite),
        }
        return new_state, metrics

    return jax.jit(
        _under_mesh(train_step, mesh),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(
    layout: Layout, shardings: State, mesh: Mesh, lora: LoraSpec | None = None
) -> Callable[[Params, Params | None, Batch], dict]:
    """`eval_step(state["params"], state.get("base"), batch)` -> summed loss and trained tokens."""

    def eval_step(params: Params, base: Params | None, batch: Batch) -> dict:
        loss_sum = _loss_sum(layout, model_params(params, base, lora), batch)
        return {"loss_sum": loss_sum, "trained_tokens": jnp.sum(batch["loss_mask"])}

    return jax.jit(
        _under_mesh(eval_step, mesh),
        in_shardings=(shardings["params"], shardings.get("base"), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
