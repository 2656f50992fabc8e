"""The whole training loop against the bare jitted step, on the same packed batches.

    python tools/bench/loop.py [--steps=6] [--hidden=512 --layers=8 --heads=8 --kv_heads=4 --vocab=32000]
        [--config=configs/tiny.py --config.data.max_seq_length=1024 --config.train.global_batch_size=4 ...]

Builds a run as `train.run` does (data, packing, Trainer, Checkpointer, logging hooks) over a random
Llama of the given shape, then times, side by side and alternating: (a) the bare jitted step over host
batches taken from the run's own stream beforehand, and (b) `Trainer.fit` with every hook of a run,
pulling batches from the live Grain iterator, logging every step. Prints seconds per step of each and
their ratio (the loop's overhead), after a warm-up that compiles the step.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time

import jax
import transformers

from jsft import config, data, sharding, train
from jsft.checkpoint import Checkpointer
from jsft.data.batching import Batching
from jsft.hooks import StepLogger
from jsft.metrics import MetricsLog
from jsft.trainer import Trainer


def random_model(folder: str, tokenizer_folder: str, args: argparse.Namespace, max_len: int) -> None:
    """A random Llama of the given shape, with the tokenizer of `tokenizer_folder`."""
    import torch

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max_len,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in (("steps", 6), ("rounds", 2), ("hidden", 512), ("layers", 8), ("heads", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    args, config_args = parser.parse_known_args()
    tmp = tempfile.mkdtemp(prefix="jsft-bench-loop-")
    defaults = [
        "--config=configs/tiny.py",
        "--config.data.max_seq_length=1024",
        "--config.train.global_batch_size=4",
    ]
    base = config.load([sys.argv[0], *(config_args or defaults)])  # its model folder lends the tokenizer
    cfg = config.load(
        [
            sys.argv[0],
            *(config_args or defaults),
            f"--config.output_dir={tmp}/run",
            f"--config.model.path={tmp}/m",
        ]
        + ["--config.log.every_steps=1", "--config.checkpoint.every_steps=1000000", "--config.mesh.data=1"]
    )
    random_model(f"{tmp}/m", base.model.path, args, cfg.data.max_seq_length)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    layout, tokenizer, _ = train.load_model_description(cfg, cfg.model.path, jax.devices()[0])
    examples = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed).examples
    stream = iter(Batching.from_config(cfg, mesh).train_batches(examples))
    checkpointer = Checkpointer(cfg)
    checkpointer.attach(stream, total_steps=10**9, hf_assets={"files": {}})
    trainer = Trainer(cfg, layout, mesh, total_steps=10**9, checkpointer=checkpointer)
    logger = StepLogger.for_run(cfg, trainer, MetricsLog(cfg.output_dir, 10**9))
    trainer.add_hook(logger.count, every=1)
    trainer.add_hook(logger.write, every=cfg.log.every_steps, at_end=True)
    state = trainer.random_state()
    print(
        f"{layout.cfg.num_params() / 1e6:.0f}M parameters, batch {cfg.train.global_batch_size} x "
        f"{cfg.data.max_seq_length}, {jax.devices()[0].device_kind}",
        flush=True,
    )

    def bare(state):
        batches = list(itertools.islice(stream, args.steps))  # taken beforehand: not timed
        start = time.perf_counter()
        for batch in batches:
            state, _ = trainer.train_step(state, trainer.device_batch(batch))
        jax.block_until_ready(state)
        return state, (time.perf_counter() - start) / args.steps

    def loop(state):
        trainer.total_steps = int(jax.device_get(state.step)) + args.steps
        start = time.perf_counter()
        state = trainer.fit(state, stream)
        jax.block_until_ready(state)
        logger.flush()
        return state, (time.perf_counter() - start) / args.steps

    state, _ = bare(state)  # compiles
    state, _ = loop(state)
    timings = {"bare": [], "loop": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("loop", loop)):
            state, seconds = fn(state)
            timings[name].append(seconds)
    bare_s, loop_s = statistics.median(timings["bare"]), statistics.median(timings["loop"])
    print(
        f"bare step {bare_s:.3f} s ({', '.join(f'{t:.3f}' for t in timings['bare'])}); "
        f"loop step {loop_s:.3f} s ({', '.join(f'{t:.3f}' for t in timings['loop'])}); "
        f"loop / bare = {loop_s / bare_s:.3f}"
    )


if __name__ == "__main__":
    main()
