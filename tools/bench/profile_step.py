"""Where jsft's train step spends its time on CPU, by XLA op: matmuls against the rest, by jsft source line.

    python tools/bench/profile_step.py [--hidden=512 --layers=8 --heads=8 --seq=1024 --batch=4 ...]
        [--top=30] [--hlo_out=step.hlo.txt]

Builds the step `tools/bench/step.py` times (a random Llama, AdamW, float32), runs it once under
`jax.profiler.trace` and reads the trace: XLA:CPU records one event per executed op (thunk), named after
its HLO instruction. Ops run concurrently on the thread pool, so each moment of the step is split
evenly between the ops running then: the shares add up to the step's busy time. Each op is classed
from the optimized HLO (a fusion holding a dot is a matmul; copies and transposes; dynamic slices,
which in a layer scan read its stacked residuals; broadcasts, the scans' zeroed accumulators) and
attributed to the innermost jsft line in its stack trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu's profiler plugin, when installed, crashes the trace

import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from jsft import flops, models, sharding  # noqa: E402
from jsft.config import default_config  # noqa: E402
from jsft.cpu_profile import CONTAINERS, op_class, parse_hlo, wall_shares  # noqa: E402
from jsft.trainer import Trainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in (("hidden", 512), ("layers", 8), ("heads", 8), ("kv_heads", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("intermediate", 1536), ("vocab", 32000), ("seq", 1024), ("batch", 4)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--top", type=int, default=30, help="lines of the by-source and by-op tables")
    parser.add_argument("--hlo_out", default=None, help="also write the optimized HLO text here")
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
    return parser.parse_args()


def build_step(args: argparse.Namespace):
    """(compiled step, state, batch) of the benchmark's model and AdamW."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model_cfg = models.ModelConfig.from_hf(config.to_dict(), scan_layers=args.scan_layers)
    cfg = default_config()
    cfg.train.global_batch_size = args.batch
    cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.clip_grad_norm = "constant", 0.0, 0.0
    trainer = Trainer(cfg, models.Layout(model_cfg), sharding.single_device_mesh(), total_steps=10)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape))
    batch = trainer.device_batch(
        dict(
            input_ids=ids,
            target_ids=np.roll(ids, -1, axis=1),
            loss_mask=np.ones_like(ids),
            segment_ids=np.ones_like(ids),
            positions=positions,
        )
    )
    state = trainer.random_state()
    return trainer.train_step.lower(state, batch).compile(), state, batch, model_cfg


def main() -> None:
    args = parse_args()
    compiled, state, batch, model_cfg = build_step(args)
    text = compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    state, metrics = compiled(state, batch)  # warm
    jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            seconds = time.perf_counter() - start
        trace = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
        ops, computations, stack = parse_hlo(text)
        events = [
            (event.name, event.start_ns, event.start_ns + event.duration_ns)
            for plane in trace.planes
            for line in plane.lines
            for event in line.events
            if "hlo_op" in dict(event.stats) and ops.get(event.name, ("",))[0] not in CONTAINERS
        ]
    shares, busy = wall_shares(events)
    model_flops = flops.mfu_flops_per_token(model_cfg, args.seq) * args.batch * args.seq
    by_class, by_source, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ns in shares.items():
        kind = op_class(name, ops, computations)
        where = next(
            (
                f"{f.rsplit('/', 1)[-1]}:{fn.rsplit('.', 1)[-1]}:{ln}"
                for f, fn, ln in stack(ops.get(name, (0, 0, None))[2])
                if "/jsft/" in f
            ),
            "-",
        )
        by_class[kind] += ns
        by_source[(kind, where)] += ns
        by_op[(kind, name)] += ns
    print(
        f"step {seconds:.2f} s traced, ops busy {busy / 1e9:.2f} s; {model_flops / 1e9:.1f} model GFLOP "
        f"({model_flops / seconds / 1e9:.1f} GFLOP/s); matmuls {by_class['matmul'] / 1e6:.0f} ms "
        f"({model_flops / max(by_class['matmul'], 1):.1f} model GFLOP per matmul second)"
    )
    print("== by class (ms, % of busy)")
    for kind, ns in by_class.most_common():
        print(f"{ns / 1e6:10.1f} {100 * ns / busy:5.1f}%  {kind}")
    print("== by class and jsft source line")
    for (kind, where), ns in by_source.most_common(args.top):
        print(f"{ns / 1e6:10.1f} {100 * ns / busy:5.1f}%  {kind:20s} {where}")
    print("== by op")
    for (kind, name), ns in by_op.most_common(args.top):
        print(f"{ns / 1e6:10.1f} {100 * ns / busy:5.1f}%  {kind:20s} {name}")


if __name__ == "__main__":
    main()
