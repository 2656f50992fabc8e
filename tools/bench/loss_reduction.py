"""`train.loss_reduction` mean vs sum at one learning rate, with constant and with varying tokens per step.

    python tools/bench/loss_reduction.py [--steps=120] [--lr=3e-3] [--config=configs/tiny.py ...]

AdamW's update is unchanged when every gradient is scaled by one constant (up to `eps`), so `sum` and
`mean` differ only where the scale changes from step to step (the trained-token count), and where
clipping or `eps` act. Runs the tiny config four ways per clipping setting, {rows, examples} batches x
{mean, sum}, and prints the spread of trained tokens per step, each run's held-out loss, and how far
the sum run's change of the parameters is from the mean run's: |delta_sum - delta_mean| / |delta_mean|,
delta = final - initial parameters (`--steps=1` isolates the step itself from trajectories drifting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

from jsft import checkpoint, config, models, sharding, train


def run(out: str, config_args: list[str], steps: int, lr: float, unit: str, reduction: str, clip: float):
    cfg = config.load(
        [
            sys.argv[0],
            *config_args,
            f"--config.output_dir={out}",
            f"--config.train.max_steps={steps}",
            f"--config.train.batch_unit={unit}",
            f"--config.train.loss_reduction={reduction}",
            f"--config.optim.lr={lr}",
            f"--config.optim.clip_grad_norm={clip}",
            "--config.log.every_steps=1",
            "--config.log.eval_every_steps=0",
            f"--config.checkpoint.every_steps={steps}",
        ]
    )
    summary = train.run(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    tokens = np.array([r["trained_tokens"] for r in records if "loss" in r])
    mngr = checkpoint.manager(os.path.join(out, "checkpoints"), read_only=True)
    layout, _ = checkpoint.saved_layout(mngr, steps)
    mesh = sharding.single_device_mesh()
    params, _, _ = checkpoint.restore_for_export(mngr, steps, layout.shapes, layout.shardings(mesh))
    initial = models.load_params(cfg.model.path, layout, mesh)
    delta = {k: np.asarray(v) - np.asarray(initial[k]) for k, v in jax.device_get(params).items()}
    return summary["eval_loss_end"], tokens, delta


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=3e-3)
    args, config_args = parser.parse_known_args()
    config_args = config_args or ["--config=configs/tiny.py"]
    with tempfile.TemporaryDirectory() as tmp:
        for clip in (0.0, 1.0):
            for unit in ("rows", "examples"):
                results = {
                    reduction: run(
                        f"{tmp}/{clip}-{unit}-{reduction}",
                        config_args,
                        args.steps,
                        args.lr,
                        unit,
                        reduction,
                        clip,
                    )
                    for reduction in ("mean", "sum")
                }
                tokens = results["mean"][1]
                mean_delta, sum_delta = results["mean"][2], results["sum"][2]
                distance = np.sqrt(sum(np.sum((sum_delta[k] - v) ** 2) for k, v in mean_delta.items()))
                scale = np.sqrt(sum(np.sum(v**2) for v in mean_delta.values()))
                print(
                    f"clip {clip:g}, batch_unit {unit}: trained tokens per step {tokens.mean():.0f} "
                    f"(cv {tokens.std() / tokens.mean():.2f}); held-out loss mean {results['mean'][0]:.4f}, "
                    f"sum {results['sum'][0]:.4f}; "
                    f"|delta_sum - delta_mean| / |delta_mean| = {distance / scale:.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
