"""The optimizer: AdamW with warmup then linear/cosine/constant decay, and global-norm clipping."""

from __future__ import annotations

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
    adamw = optax.adamw(
        make_schedule(optim_cfg, total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda params: {name: decays(name) for name in params},
    )
    if optim_cfg.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_grad_norm), adamw)
    return adamw
