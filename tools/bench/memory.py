"""Per-device memory of a config's train step, from the compiled program, on simulated devices.

    python tools/bench/memory.py --config=configs/tulu.py --devices=64 [--config.model.remat=full ...]
        [--hf_config=path/to/config.json]

Compiles (never runs) the train step of the config's model and batch over `--devices` simulated CPU
devices laid out by the config's mesh, and prints XLA's memory analysis per device: the state
(parameters, optimizer moments), the batch, and the temporaries (activations kept for the backward
pass, gradients, the loss's logit chunks). The model comes from `--hf_config`, or from
`model.path`/config.json, or the HF cache, or jsft's shape table of known models
(`jsft/models/shapes.py`: Llama 3.1 8B for Tulu 3) when the folder is not here.
`python -m jsft.cli.plan` prints the same figures with the sharding, the steps and a search for a fit.

The CPU compiler stands in for the accelerator's: sizes of parameters, moments and batches are exact;
temporaries are XLA:CPU's schedule of the same program, an upper estimate of an accelerator's: XLA:CPU
computes bfloat16 matmuls in float32, so matmul outputs kept for the backward pass count double.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--hf_config", default="")
    args, config_args = parser.parse_known_args()
    # The memory-minimising scheduler: XLA:CPU's default one favours concurrency and inflates temporaries.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.devices} "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

    from jsft import config, models, sharding
    from jsft.models import shapes
    from jsft.trainer import Trainer

    cfg = config.load_or_exit([sys.argv[0], *config_args])
    if args.hf_config:
        with open(args.hf_config) as f:
            hf_config = json.load(f)
    else:
        hf_config, _ = shapes.hf_config(cfg.model.path, cfg.model.revision)
    dtype = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
    model_cfg = models.ModelConfig.from_hf(
        hf_config,
        models.dtype_of(dtype),
        models.dtype_of(cfg.model.param_dtype),
        "xla",
        cfg.model.remat,
        cfg.model.scan_layers,
    )
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=1000)
    rows, seq = cfg.train.global_batch_size, cfg.data.max_seq_length
    print(
        f"{model_cfg.num_params() / 1e9:.2f}B parameters ({cfg.model.param_dtype}), compute {dtype}, "
        f"remat {cfg.model.remat}, {'scanned' if cfg.model.scan_layers else 'unrolled'} layers; "
        f"mesh {dict(mesh.shape)}; global batch {rows} x {seq}, accumulation {cfg.train.grad_accum_steps}",
        flush=True,
    )
    memory = trainer.compile_train_step(rows, seq).memory_analysis()
    gib = 2**30
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    print(
        f"per device: state + batch {memory.argument_size_in_bytes / gib:.2f} GiB, "
        f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB, "
        f"peak about {(total + memory.temp_size_in_bytes) / gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
