"""One-shot check of jsft on one NVIDIA GPU, written to run once in minutes; runs end to end on CPU too.

    python tools/gpu_check.py [--out=gpu_check.json] [--rows=4 --seq=4096] [--steps=5]

1. cuDNN attention (`model.attention=cudnn`) against jsft's float32 reference on packed GQA rows in
   bfloat16: forward and the gradients of q, k and v.
2. The bfloat16 train step of a ~1B Llama (Llama-3.2-1B's shape) on rows of `--seq` tokens: jsft's
   Trainer against transformers + torch (SDPA, bf16 autocast, fused AdamW) on the same batch, with
   tokens/s and MFU (jsft.flops, the device's peak).
3. The tiny config end to end (20 steps, checkpoints every 10) and an exact resume from step 10.
Every figure goes to `--out` as JSON. On a machine without an NVIDIA GPU, part 1 is skipped and part 2
runs a small model (both say so in the JSON), so the script itself is checked on CPU before GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

# jax takes 75% of the GPU at start by default; torch's step runs in the same process
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import transformers

from jsft import config, flops, models, sharding, train
from jsft.config import default_config
from jsft.models import attention, shapes
from jsft.trainer import Trainer

# Llama-3.2-1B's published config.json (jsft's shape table), and a small model of its kind for CPU runs.
LLAMA_1B = {k: v for k, v in shapes.LLAMA_32_1B.items() if k != "model_type"}
CPU_SMALL = LLAMA_1B | dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu" and "NVIDIA" in jax.devices()[0].device_kind.upper()


def check_attention(seq: int) -> dict:
    if not on_gpu():
        return {"skipped": "no NVIDIA GPU: the cuDNN path needs one"}
    rng = np.random.default_rng(0)
    b, h, kv, d = 2, 32, 8, 128
    q, k, v = (jnp.asarray(rng.normal(size=(b, seq, n, d)), jnp.bfloat16) for n in (h, kv, kv))
    segments = np.zeros((b, seq), np.int32)
    for row, cuts in enumerate(([0, 700, 1900, seq - 300], [0, 1500, seq - 37])):
        for i, (start, end) in enumerate(zip(cuts, cuts[1:] + [seq], strict=True)):
            segments[row, start:end] = i + 1
    segments[1, -37:] = 0  # padding
    segments = jnp.asarray(segments)
    scale = d**-0.5

    def loss(fn):
        return jax.jit(
            jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2))
        )

    cudnn = loss(lambda q, k, v: attention.masked_attention(q, k, v, segments, scale=scale))
    reference = loss(
        lambda q, k, v: attention.dot_product_attention(
            *(x.astype(jnp.float32) for x in (q, k, v)), segments, scale=scale
        )
    )
    (value, grads), (ref_value, ref_grads) = cudnn(q, k, v), reference(q, k, v)
    relative = {
        name: float(jnp.linalg.norm((g.astype(jnp.float32) - r).ravel()) / jnp.linalg.norm(r.ravel()))
        for name, g, r in zip("qkv", grads, ref_grads, strict=True)
    }
    return {
        "shape": [b, seq, h, kv, d],
        "loss_relative": float(abs(value - ref_value) / abs(ref_value)),
        "grad_relative": relative,
        "ok": max(relative.values()) < 2e-2,
    }


def check_step(rows: int, seq: int, steps: int) -> dict:
    shape = LLAMA_1B if on_gpu() else CPU_SMALL
    seq = seq if on_gpu() else 256
    hf = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    cfg = default_config()
    cfg.train.global_batch_size = rows
    cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.clip_grad_norm = "constant", 0.0, 0.0
    model_cfg = models.ModelConfig.from_hf(hf.to_dict(), dtype=models.dtype_of("bfloat16"))
    trainer = Trainer(cfg, models.Layout(model_cfg), sharding.single_device_mesh(), total_steps=steps + 2)
    state = trainer.random_state()
    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (rows, seq)).astype(np.int32)
    # torch first: its allocator gives its memory back, XLA's keeps what it took until the process ends
    try:
        torch_figures = torch_step(hf, ids, steps)
    except Exception as e:  # jsft's figures still count
        torch_figures = {"torch_error": f"{type(e).__name__}: {e}"[:500]}
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()
    batch = {
        "input_ids": ids,
        "target_ids": np.roll(ids, -1, 1),
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": positions,
    }
    batch = trainer.device_batch(batch)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    jsft_s = statistics.median(times[1:])
    memory = jax.devices()[0].memory_stats() or {}
    per_token = flops.mfu_flops_per_token(model_cfg, seq)
    peak = flops.device_peak_flops()
    out = {
        "model": "Llama-3.2-1B shape" if on_gpu() else "small (CPU)",
        "params": model_cfg.num_params(),
        "rows": rows,
        "seq": seq,
        "compile_s": compile_s,
        "jsft_step_s": jsft_s,
        "jsft_tokens_per_s": rows * seq / jsft_s,
        "attention": attention.resolve_attention_impl(model_cfg),
    }
    if "peak_bytes_in_use" in memory:
        out["jsft_peak_gib"] = memory["peak_bytes_in_use"] / 2**30
    if peak:
        out["jsft_mfu"] = flops.mfu(rows * seq / jsft_s, per_token, peak)
    out.update(torch_figures)
    if "torch_step_s" in out:
        out["jsft_over_torch_tokens_per_s"] = out["torch_step_s"] / jsft_s
        if peak:
            out["torch_mfu"] = flops.mfu(rows * seq / out["torch_step_s"], per_token, peak)
    return out


def torch_step(hf: transformers.LlamaConfig, ids: np.ndarray, steps: int) -> dict:
    try:
        import torch
    except ImportError:
        return {"torch": "skipped: torch is not installed"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    inputs = torch.from_numpy(ids).long().to(device)
    targets = torch.roll(inputs, -1, 1)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    out = {"torch_device": device, "torch_step_s": seconds, "torch_tokens_per_s": ids.size / seconds}
    if device == "cuda":
        out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del model, optimizer, inputs, targets
        torch.cuda.empty_cache()
    return out


def check_resume() -> dict:
    with tempfile.TemporaryDirectory() as tmp:

        def run(out: str) -> dict:
            cfg = config.load(
                [
                    "gpu_check",
                    "--config=configs/tiny.py",
                    f"--config.output_dir={out}",
                    "--config.train.max_steps=20",
                    "--config.checkpoint.every_steps=10",
                    "--config.log.every_steps=1",
                    "--config.log.eval_every_steps=0",
                ]
            )
            summary = train.run(cfg)
            with open(f"{out}/metrics.jsonl") as f:
                return {
                    "summary": summary,
                    "losses": {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r},
                }

        first = run(f"{tmp}/a")
        shutil.copytree(f"{tmp}/a", f"{tmp}/b")
        shutil.rmtree(f"{tmp}/b/checkpoints/20")
        resumed = run(f"{tmp}/b")
        same = all(resumed["losses"][s] == first["losses"][s] for s in range(11, 21))
        summary = first["summary"]
        return {
            "tiny_eval_loss": [summary["eval_loss_start"], summary["eval_loss_end"]],
            "tiny_wall_s": summary["wall_seconds"],
            "resume_bit_identical_losses": same,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    report = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    for name, check in (
        ("attention", lambda: check_attention(args.seq)),
        ("train_step", lambda: check_step(args.rows, args.seq, args.steps)),
        ("tiny_run", check_resume),
    ):
        part_started = time.perf_counter()
        try:
            report[name] = check()
        except Exception as e:  # one failing part must not hide the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        report[name]["seconds"] = time.perf_counter() - part_started
        print(name, json.dumps(report[name]), flush=True)
    report["seconds"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    sys.exit(0 if all("error" not in report[k] for k in ("attention", "train_step", "tiny_run")) else 1)


if __name__ == "__main__":
    main()
