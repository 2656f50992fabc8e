"""The optimizer: AdamW (moments in float32, the parameters' dtype, or bfloat16) or Adafactor, with warmup
then linear/cosine/constant decay, and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_steps(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> int:
    if optim_cfg.warmup_steps >= 0:
        return min(int(optim_cfg.warmup_steps), total_steps)
    return int(round(optim_cfg.warmup_ratio * total_steps))


def make_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then the decay; matches transformers' `get_*_schedule_with_warmup`."""
    lr, warmup = optim_cfg.lr, warmup_steps(optim_cfg, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "linear": optax.linear_schedule(lr, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(lr, decay_steps),
        "constant": optax.constant_schedule(lr),
    }[optim_cfg.schedule]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decays(name: str) -> bool:
    """Weight decay applies to matrices, not to norms, biases or embeddings (the open-instruct default)."""
    return not (name.endswith(".scale") or "_bias" in name or name == "embed")


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW as `optax.adamw` builds it (the same chain, so the same state tree), or Adafactor; both
    with decoupled weight decay on `decays` parameters, after global-norm clipping."""
    schedule = make_schedule(optim_cfg, total_steps)
    mask = lambda params: {name: decays(name) for name in params}  # noqa: E731
    if optim_cfg.name == "adafactor":
        # The learning rate is the schedule's, not Adafactor's relative step (no parameter scale), and
        # clipping is the global norm's below; no first moment, so the state is ~ rows + columns.
        update = optax.adafactor(
            schedule,
            multiply_by_parameter_scale=False,
            clipping_threshold=None,
            weight_decay_rate=optim_cfg.weight_decay or None,
            weight_decay_mask=mask,
        )
    else:
        moments = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
        if optim_cfg.moment_dtype != "param":
            moments = moments_stored_in(jnp.dtype(optim_cfg.moment_dtype), moments)
        update = optax.chain(
            moments,
            optax.add_decayed_weights(optim_cfg.weight_decay, mask),
            optax.scale_by_learning_rate(schedule),
        )
    if optim_cfg.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_grad_norm), update)
    return update


def moments_stored_in(dtype: jnp.dtype, adam: optax.GradientTransformation) -> optax.GradientTransformation:
    """`scale_by_adam` computing in float32 with its moments stored in `dtype`.

    The first moment is rounded to nearest (its per-step change, 1 - b1 = 10%, is far above bfloat16's
    0.4% spacing). The second moment changes by 1 - b2 = 0.1% a step: rounded to nearest, it would never
    move, so it is rounded stochastically (up with the probability of the remainder), which is unbiased."""

    def store(state: optax.ScaleByAdamState) -> optax.ScaleByAdamState:
        key = jax.random.fold_in(jax.random.key(0), state.count)
        leaves, tree = jax.tree.flatten(state.nu)
        keys = jax.random.split(key, len(leaves))
        nu = jax.tree.unflatten(
            tree, [_round_stochastically(x, k, dtype) for x, k in zip(leaves, keys, strict=True)]
        )
        return state._replace(mu=jax.tree.map(lambda x: x.astype(dtype), state.mu), nu=nu)

    def compute(state: optax.ScaleByAdamState) -> optax.ScaleByAdamState:
        f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
        return state._replace(mu=f32(state.mu), nu=f32(state.nu))

    def init(params):
        return store(adam.init(params))

    def update(updates, state, params=None):
        updates, new_state = adam.update(updates, compute(state), params)
        return updates, store(new_state)

    return optax.GradientTransformation(init, update)


def _round_stochastically(x: jax.Array, key: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """float32 -> bfloat16 rounded up with the probability of the dropped low 16 bits (float32 otherwise
    as is); exact in expectation for the finite values a second moment holds."""
    if dtype != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
