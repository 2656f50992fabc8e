"""What LoRA and QLoRA save: memory of an 8B train step, and time of a ~60M step on the CPU.

    python tools/bench/lora.py [--rank=16] [--seq=4096] [--skip_memory] [--skip_time]

Memory: a Llama-3.1-8B-shaped model (`jsft.models.shapes.LLAMA_31_8B`) on one device, one row of
`--seq` tokens per step, remat full, scanned layers, bf16 compute, XLA attention; the train step is
compiled, never run (XLA:CPU's memory analysis, with the memory-minimising scheduler as bench/memory.py
uses), for full fine-tuning (float32 weights and Adam moments), LoRA over a bf16 base and QLoRA over
an nf4 base (factors on every projection). Columns: the frozen base, the trained parameters with their
Adam moments (full FT: all weights), the step's temporaries (activations kept for the backward pass,
gradients, the per-layer dequantized kernels, the loss's logit chunks), and the peak.

With `--topology=v6e-8` (libtpu installed) the same step is compiled by the TPU compiler for one chip
of that slice instead: an accelerator's own memory analysis. XLA:CPU computes bf16 matmuls in float32
and, for a scanned bf16 weight, converts the whole stacked array to float32 before the layer loop, so
the CPU figures of a bf16 base include a float32 copy of it that accelerators never make.

Time: the same three variants' step on a ~60M Llama (8 layers, hidden 512, vocab 32000), float32 on the
CPU, on the same batch; the steps of the three alternate, and the fastest of each is compared.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

from jsft import runtime

runtime.prepare_tpu_compile()  # JAX on the CPU; with --topology, libtpu compiles as for jsft.cli.tpu
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jsft import models, sharding  # noqa: E402
from jsft.config import default_config  # noqa: E402
from jsft.models.shapes import LLAMA_31_8B  # noqa: E402
from jsft.planning.compiled import topology_devices  # noqa: E402
from jsft.trainer import Trainer  # noqa: E402
from jsft.units import GIB  # noqa: E402

SMALL_LLAMA = dict(
    LLAMA_31_8B,
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    rope_scaling=None,
)
VARIANTS = {  # name -> lora settings (rank 0: full fine-tuning)
    "full FT": dict(rank=0),
    "LoRA (bf16 base)": dict(base_quantization="none"),
    "QLoRA (nf4 base)": dict(base_quantization="nf4"),
}


def make_trainer(
    hf_config: dict, variant: dict, rank: int, dtype: str, remat: str, rows: int, seq: int, device=None
):
    cfg = default_config()
    cfg.model.remat, cfg.train.global_batch_size, cfg.data.max_seq_length = remat, rows, seq
    cfg.lora.rank = rank
    for key, value in variant.items():
        cfg.lora[key] = value
    model_cfg = models.ModelConfig.from_hf(
        hf_config, models.dtype_of(dtype), models.dtype_of("float32"), "xla", remat, True
    )
    if device is None:
        return Trainer(cfg, models.Layout(model_cfg), sharding.single_device_mesh(), total_steps=1000)
    mesh = jax.sharding.Mesh(np.asarray([device]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES)
    return Trainer(cfg, models.Layout(model_cfg, device=device), mesh, total_steps=1000)


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory(rank: int, seq: int, topology: str) -> None:
    device = topology_devices(topology)[0] if topology else None
    where = f"one {topology} chip (TPU compiler)" if topology else "one CPU device (XLA:CPU)"
    print(f"8B memory, {where}, 1 x {seq} tokens, remat full, rank {rank} on all projections (GiB):")
    print(f"{'':18} {'base':>7} {'trained+Adam':>13} {'temporaries':>12} {'peak':>7}")
    for name, variant in VARIANTS.items():
        trainer = make_trainer(LLAMA_31_8B, variant, rank, "bfloat16", "full", 1, seq, device)
        abstract = trainer.abstract_state()
        base = tree_bytes(abstract.base) if abstract.base is not None else 0
        trained = tree_bytes(abstract.params) + tree_bytes(abstract.opt_state)
        try:
            analysis = trainer.compile_train_step(1, seq).memory_analysis()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds the chip's HBM
            needed = re.search(r"temporaries \(([\d.]+G)\)", str(e))
            print(f"{name:18} {base / GIB:7.2f} {trained / GIB:13.2f}  does not fit one chip", end="")
            print(f" (temporaries {needed.group(1)})" if needed else "", flush=True)
            continue
        state_and_batch = analysis.argument_size_in_bytes
        peak = state_and_batch + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        peak += analysis.temp_size_in_bytes
        print(
            f"{name:18} {base / GIB:7.2f} {trained / GIB:13.2f} {analysis.temp_size_in_bytes / GIB:12.2f} "
            f"{peak / GIB:7.2f}",
            flush=True,
        )


def step_time(rank: int, rows: int, seq: int, rounds: int) -> None:
    """Each variant's step, compiled first, then timed in alternation for `rounds` rounds: the fastest
    of each (the least disturbed by other work on the machine) and the median."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SMALL_LLAMA["vocab_size"], (rows, seq)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "target_ids": np.roll(ids, -1, 1),
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
    }
    n_params = models.ModelConfig.from_hf(SMALL_LLAMA).num_params()
    print(f"CPU step time, {n_params / 1e6:.0f}M Llama, float32, batch {rows} x {seq}, rank {rank}:")
    runs = {}
    for name, variant in VARIANTS.items():
        trainer = make_trainer(SMALL_LLAMA, variant, rank, "float32", "none", rows, seq)
        state = trainer.random_state(0)
        device_batch = trainer.device_batch(batch)
        state, metrics = trainer.train_step(state, device_batch)  # compile
        jax.block_until_ready((state, metrics))
        runs[name] = [trainer, state, device_batch, []]
    for _ in range(rounds):
        for run in runs.values():
            trainer, state, device_batch, measured = run
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, device_batch)
            jax.block_until_ready((state, metrics))
            measured.append(time.perf_counter() - start)
            run[1] = state
    fastest = {name: min(run[3]) for name, run in runs.items()}
    for name, run in runs.items():
        ratio = fastest[name] / fastest["full FT"]
        print(
            f"{name:18} {fastest[name]:6.2f} s/step fastest ({ratio:.2f}x full FT), "
            f"median {statistics.median(run[3]):.2f} s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--time_rows", type=int, default=4)
    parser.add_argument("--time_seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--topology", default="", help="e.g. v6e-8: compile for one TPU chip (libtpu)")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_time", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        memory(args.rank, args.seq, args.topology)
    if not args.skip_time:
        step_time(args.rank, args.time_rows, args.time_seq, args.rounds)


if __name__ == "__main__":
    main()
