"""Lean optimizer state against AdamW in float32: its size at 8B and the held-out loss after the tiny run.

    python tools/bench/optimizers.py [--steps=600] [--model=meta-llama/Llama-3.1-8B] [--config=FILE ...]

For each of AdamW (float32 moments), AdamW with bfloat16 moments (`optim.moment_dtype=bfloat16`) and
Adafactor (`optim.name=adafactor`): the optimizer state's bytes for the named model's shapes (from
`optax`'s own `init`, traced, never allocated; float32 parameters, no LoRA), and the tiny config's run
(the default is its whole 600 steps): held-out loss at the end, the worst gap to float32 AdamW's held-out
losses along the way, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax

from jsft import config, models, optim, step, train
from jsft.models import shapes
from jsft.units import GIB

SETTINGS = {
    "adamw float32": ["--config.optim.moment_dtype=float32"],
    "adamw bfloat16 moments": ["--config.optim.moment_dtype=bfloat16"],
    "adafactor": ["--config.optim.name=adafactor"],
}


def state_gib(model: str, optim_args: list[str]) -> float:
    """The optimizer state of `model`'s trainable parameters, GiB over all devices."""
    cfg = config.load([sys.argv[0], "--config=configs/tiny.py", *optim_args])
    hf, _ = shapes.hf_config(model)
    layout = models.Layout(models.ModelConfig.from_hf(hf))
    optimizer = optim.make_optimizer(cfg.optim, 1000)
    state = jax.eval_shape(optimizer.init, step.trainable_shapes(layout))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / GIB


def held_out_losses(out: str, config_args: list[str], optim_args: list[str], steps: int) -> dict[int, float]:
    cfg = config.load(
        [
            sys.argv[0],
            *config_args,
            *optim_args,
            f"--config.output_dir={out}",
            f"--config.train.max_steps={steps}",
        ]
    )
    train.run(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    args, config_args = parser.parse_known_args()
    config_args = config_args or ["--config=configs/tiny.py"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, optim_args in SETTINGS.items():
            started = time.perf_counter()
            losses = held_out_losses(f"{tmp}/{len(results)}", config_args, optim_args, args.steps)
            results[name] = (state_gib(args.model, optim_args), losses, time.perf_counter() - started)
    reference = results["adamw float32"][1]
    print(f"optimizer state for {args.model}; held-out losses of {' '.join(config_args)}, {args.steps} steps")
    print(f"{'optimizer':<24} {'state GiB':>10} {'held-out end':>13} {'max gap':>8} {'wall s':>7}")
    for name, (gib, losses, wall) in results.items():
        gap = max(abs(losses[s] - reference[s]) for s in reference if s in losses)
        print(f"{name:<24} {gib:>10.2f} {losses[max(losses)]:>13.4f} {gap:>8.4f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
