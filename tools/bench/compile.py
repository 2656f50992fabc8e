"""Compile time of the train step against depth, with layers scanned and unrolled.

    python tools/bench/compile.py [--layers 2 4 8 16 32] [--hidden 256 --seq 256 --batch 2]

Compiles (never runs) the `Trainer`'s train step for a random Llama of each depth, once with
`scan_layers=True` (one layer body in the program, whatever the depth) and once unrolled, and prints
seconds to lower and compile plus the optimised program's size in HLO instructions.
"""

from __future__ import annotations

import argparse
import time

import jax
import transformers

from jsft import models, sharding
from jsft.config import default_config
from jsft.trainer import Trainer


def compile_seconds(layers: int, scan: bool, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds to lower and compile the train step, instructions in the compiled HLO)."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    model_cfg = models.ModelConfig.from_hf(config.to_dict(), scan_layers=scan, remat=args.remat)
    cfg = default_config()
    cfg.train.global_batch_size = args.batch
    trainer = Trainer(cfg, models.Layout(model_cfg), sharding.single_device_mesh(), total_steps=10)
    start = time.perf_counter()
    compiled = trainer.compile_train_step(args.batch, args.seq)
    seconds = time.perf_counter() - start
    instructions = sum(line.strip().startswith(("%", "ROOT")) for line in compiled.as_text().splitlines())
    return seconds, instructions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()
    print(f"hidden {args.hidden}, seq {args.seq}, batch {args.batch}, remat {args.remat}; {jax.devices()[0]}")
    print("layers | scanned: compile s, HLO instructions | unrolled: compile s, HLO instructions")
    for layers in args.layers:
        scanned = compile_seconds(layers, True, args)
        unrolled = compile_seconds(layers, False, args)
        print(
            f"{layers:6d} | {scanned[0]:7.1f} s {scanned[1]:7d} | {unrolled[0]:7.1f} s {unrolled[1]:7d}",
            flush=True,
        )


if __name__ == "__main__":
    main()
