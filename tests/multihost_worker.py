"""One process of the two-process test (run by tests/test_multihost.py, not collected by pytest).

    python tests/multihost_worker.py MODEL_DIR OUT.npz NUM_PROCESSES PROCESS_ID PORT [MESH_JSON]

Every process builds the same global batch and feeds only its own rows (those of its row group: a
context axis across the processes makes them share rows); process 0 saves the losses and the final
parameters. The one-process reference is `train(MODEL_DIR, num_devices=4)` in the test's own process.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(model_dir: str, out: str, num_processes: int, process_id: int, port: int, mesh: dict) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    result = train(model_dir, mesh_shape=mesh)
    if jax.process_index() == 0:
        np.savez(out, **result)


def train(
    model_dir: str, num_devices: int | None = None, mesh_shape: dict | None = None
) -> dict[str, np.ndarray]:
    """Three steps on the same global batches over all devices (or the first `num_devices`) on
    `mesh_shape` (default: fsdp over all): {"losses": ..., parameter name: its global value}."""
    from jsft import models, sharding
    from jsft.config import default_config
    from jsft.trainer import Trainer

    model_cfg, _ = models.config_from_folder(model_dir)
    devices = jax.devices()[:num_devices] if num_devices else None
    mesh = sharding.make_mesh(mesh_shape or {"data": 1, "fsdp": -1, "tensor": 1}, devices)
    cfg = default_config()
    cfg.optim.lr, cfg.optim.warmup_ratio = 1e-3, 0.0
    cfg.train.grad_accum_steps = 2
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=10)
    state = trainer.fresh_state(models.load_params(model_dir, trainer.layout, mesh))
    rows, seq = 8, 32
    group, groups = sharding.row_groups(mesh)
    local = rows // groups
    losses = []
    for s in range(3):
        rng = np.random.default_rng(s)
        batch = {
            "input_ids": rng.integers(1, model_cfg.vocab_size, (rows, seq)).astype(np.int32),
            "target_ids": rng.integers(1, model_cfg.vocab_size, (rows, seq)).astype(np.int32),
            "loss_mask": (rng.random((rows, seq)) < 0.5).astype(np.int32),
            "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 12]), rows, 0).astype(np.int32),
            "positions": np.repeat(np.array([list(range(20)) + list(range(12))]), rows, 0).astype(np.int32),
        }
        mine = {k: v[group * local : (group + 1) * local] for k, v in batch.items()}
        state, metrics = trainer.train_step(state, trainer.device_batch(mine))
        losses.append(float(metrics["loss"]))
    from jax.experimental import multihost_utils

    params = {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in state.params.items()
    }
    return {"losses": np.asarray(losses), **params}


if __name__ == "__main__":
    mesh = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), mesh)
