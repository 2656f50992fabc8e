"""Benchmark: load time and peak host memory of `models.load_params` on a sharded checkpoint.

    python tools/bench/load.py [--folder=/tmp/jsft-bench-load] [--layers=10] [--dtype=bfloat16]
        [--mesh=1,4,2] [--devices=8]

Writes (once) a random Llama-shaped checkpoint of about 1.2 GB in bfloat16 safetensors shards of 256 MB,
then loads it in a fresh process onto a (data, fsdp, tensor) mesh of simulated CPU devices and prints
the load time and the process's peak RSS. On CPU the devices' arrays live in host memory too, so the
figure to read is peak RSS above the baseline against the bytes the devices hold: streaming keeps the
difference near one tensor, where a replicated copy per device would cost `devices` times the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
)


def make_checkpoint(folder: str, layers: int) -> None:
    """A random Llama in bfloat16 safetensors shards, written tensor by tensor into 256 MB files."""
    import ml_dtypes

    from jsft import hf

    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    q, kv = SHAPE["num_attention_heads"] * SHAPE["head_dim"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (d,),
            layer + "post_attention_layernorm.weight": (d,),
            layer + "self_attn.q_proj.weight": (q, d),
            layer + "self_attn.k_proj.weight": (kv, d),
            layer + "self_attn.v_proj.weight": (kv, d),
            layer + "self_attn.o_proj.weight": (d, q),
            layer + "mlp.gate_proj.weight": (f, d),
            layer + "mlp.up_proj.weight": (f, d),
            layer + "mlp.down_proj.weight": (d, f),
        }
    rng = np.random.default_rng(0)
    tensors = {
        name: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        for name, shape in shapes.items()
    }
    hf.save_tensors(tensors, folder, max_shard_bytes=256 * 2**20)
    config = dict(
        SHAPE,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=layers,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        hidden_act="silu",
        dtype="bfloat16",
    )
    with open(os.path.join(folder, "config.json"), "w") as file:
        json.dump(config, file, indent=2)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: str, dtype: str, mesh_sizes: list[int]) -> dict:
    """Runs in a fresh process: loads the folder and reports time and memory."""
    import jax

    from jsft import hf, models, sharding

    jax.devices()
    baseline = current_rss_bytes()
    cfg, hf_config = models.config_from_folder(folder, dtype, dtype)
    layout = models.Layout(cfg)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_sizes, strict=True)))
    start = time.perf_counter()
    params = models.load_params(folder, layout, mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    on_devices = sum(s.data.nbytes for p in params.values() for s in p.addressable_shards)
    files = hf.safetensors_files(folder)
    return {
        "checkpoint_bytes": sum(os.path.getsize(f) for f in files),
        "checkpoint_files": len(files),
        "params": sum(int(np.prod(p.shape)) for p in params.values()),
        "dtype": dtype,
        "mesh": dict(mesh.shape),
        "load_seconds": round(seconds, 2),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "device_bytes": on_devices,
        "largest_tensor_bytes": max(int(np.prod(p.shape)) * p.dtype.itemsize for p in params.values()),
    }


def report(r: dict) -> str:
    gib = 2**30
    above = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    devices = int(np.prod(list(r["mesh"].values())))
    return "\n".join(
        [
            f"checkpoint: {r['checkpoint_bytes'] / gib:.2f} GiB in {r['checkpoint_files']} safetensors "
            f"files, {r['params'] / 1e6:.0f}M params, loaded as {r['dtype']} onto mesh {r['mesh']}",
            f"load time: {r['load_seconds']:.2f} s "
            f"({r['checkpoint_bytes'] / gib / r['load_seconds']:.2f} GiB/s)",
            f"peak RSS: {r['peak_rss_bytes'] / gib:.2f} GiB (baseline after imports "
            f"{r['baseline_rss_bytes'] / gib:.2f} GiB, so {above / gib:.2f} GiB for loading)",
            f"held by the {devices} CPU devices (host memory here): {r['device_bytes'] / gib:.2f} GiB; "
            f"loading overhead beyond that: {(above - r['device_bytes']) / gib:.2f} GiB "
            f"(largest tensor {r['largest_tensor_bytes'] / gib:.2f} GiB; "
            f"a replicated copy per device would hold {devices * r['device_bytes'] / gib:.1f} GiB)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/jsft-bench-load", help="checkpoint folder (made if absent)")
    parser.add_argument("--layers", type=int, default=10, help="layers of the made checkpoint (10: 1.2 GB)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="param dtype")
    parser.add_argument("--mesh", default="1,4,2", help="data,fsdp,tensor sizes")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = parser.parse_args()
    mesh_sizes = [int(s) for s in args.mesh.split(",")]
    if args.measure:
        print(json.dumps(measure(args.folder, args.dtype, mesh_sizes)))
        return
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        print(f"writing a {args.layers}-layer random checkpoint to {args.folder} ...", flush=True)
        make_checkpoint(args.folder, args.layers)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    out = subprocess.run(
        [sys.executable, __file__, "--measure", f"--folder={args.folder}", f"--dtype={args.dtype}"]
        + [f"--mesh={args.mesh}"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    print(report(json.loads(out.strip().splitlines()[-1])))


if __name__ == "__main__":
    main()
