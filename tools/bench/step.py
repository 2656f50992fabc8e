"""Times jsft's jitted train step on a random Llama against the same step in PyTorch transformers.

    python tools/bench/step.py [--hidden=512 --layers=8 --heads=8 --seq=1024 --batch=4 ...]
        [--peak_flops=1.2e11] [--skip_torch] [--no-scan_layers]
        [--experts=8 --experts_per_token=2 --expert_intermediate=512]   # a Qwen3-MoE instead

With `--experts`, both sides train a Qwen3-MoE of the same sizes (softmax router, top k, renormalised),
each with its routers' load-balancing loss (transformers': `output_router_logits=True`).

Both sides train the same architecture on the same unpacked batch (loss on every token) with AdamW of
the same lr/betas/eps and no clipping or weight decay. Reported per side: the median step time after
warmup, tokens/s, achieved model FLOP/s (`jsft.flops`, PaLM convention) and MFU when the peak is known
(pass `--peak_flops` on CPU, which has no table entry), then the jsft/torch throughput ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import transformers

from jsft import flops, models, sharding
from jsft.config import default_config
from jsft.trainer import Trainer

LEARNING_RATE, BETAS, EPS = 1e-4, (0.9, 0.999), 1e-8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s per device (CPU)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--experts", type=int, default=0, help="above 0: a Qwen3-MoE with this many experts")
    parser.add_argument("--experts_per_token", type=int, default=2)
    parser.add_argument("--expert_intermediate", type=int, default=512)
    parser.add_argument(
        "--scan_layers", action=argparse.BooleanOptionalAction, default=True, help="model.scan_layers"
    )
    return parser.parse_args()


def hf_config(args: argparse.Namespace) -> transformers.PretrainedConfig:
    """The one architecture both sides build; jsft reads it the way it reads a model folder."""
    sizes = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.seq,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    if not args.experts:
        return transformers.LlamaConfig(**sizes)
    return transformers.Qwen3MoeConfig(
        **sizes,
        moe_intermediate_size=args.expert_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.experts_per_token,
        norm_topk_prob=True,
        output_router_logits=True,
    )


def random_tokens(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, target_ids) [batch, seq]: random ids, targets the next token (wrapping at the end)."""
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    return ids, np.roll(ids, -1, axis=1)


def time_steps(run_step, warmup: int, steps: int) -> list[float]:
    """Seconds per step of `run_step()` (which must block until its results exist), after `warmup` calls."""
    for _ in range(warmup):
        run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times


def bench_jsft(
    args: argparse.Namespace, config: transformers.PretrainedConfig
) -> tuple[list[float], float, float]:
    """(step seconds, compile seconds, FLOPs per step as XLA counts them)."""
    model_cfg = models.ModelConfig.from_hf(
        config.to_dict(), dtype=models.dtype_of(args.dtype), scan_layers=args.scan_layers
    )
    cfg = default_config()
    cfg.train.global_batch_size = args.batch
    cfg.optim.lr, (cfg.optim.b1, cfg.optim.b2), cfg.optim.eps = LEARNING_RATE, BETAS, EPS
    cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.clip_grad_norm = "constant", 0.0, 0.0
    cfg.optim.weight_decay = 0.0
    trainer = Trainer(
        cfg, models.Layout(model_cfg), sharding.single_device_mesh(), total_steps=args.warmup + args.steps
    )
    state = trainer.random_state()
    input_ids, target_ids = random_tokens(args)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), input_ids.shape)
    batch = {
        "input_ids": input_ids,
        "target_ids": target_ids,
        "loss_mask": np.ones_like(input_ids),
        "segment_ids": np.ones_like(input_ids),
        "positions": np.ascontiguousarray(positions),
    }
    batch = trainer.device_batch(batch)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]

    def run_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    return time_steps(run_step, args.warmup, args.steps), compile_seconds, xla_flops


def bench_torch(args: argparse.Namespace, config: transformers.PretrainedConfig) -> list[float]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=0.0
    )
    input_ids, target_ids = (torch.from_numpy(x).long() for x in random_tokens(args))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def run_step():
        with autocast:
            outputs = model(input_ids=input_ids)
        logits = outputs.logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, args.vocab), target_ids.view(-1))
        if args.experts:
            loss = loss + config.router_aux_loss_coef * outputs.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(run_step, args.warmup, args.steps)


def report(name: str, times: list[float], tokens: int, flops_per_step: float, peak: float | None) -> float:
    """Prints one side's figures; returns its tokens/s."""
    seconds = statistics.median(times)
    tokens_per_sec = tokens / seconds
    line = (
        f"{name}: median step {seconds:.2f} s (of {', '.join(f'{t:.2f}' for t in times)}), "
        f"{tokens_per_sec:.1f} tokens/s, {flops_per_step / seconds / 1e9:.1f} model GFLOP/s"
    )
    if peak is not None:
        line += f", MFU {100 * flops.mfu(tokens_per_sec, flops_per_step / tokens, peak):.1f}%"
    print(line, flush=True)
    return tokens_per_sec


def main() -> None:
    args = parse_args()
    config = hf_config(args)
    cfg = models.ModelConfig.from_hf(config.to_dict())
    tokens = args.batch * args.seq
    model_flops = flops.mfu_flops_per_token(cfg, args.seq) * tokens
    peak = flops.device_peak_flops(override=args.peak_flops)
    kind = (
        f"Qwen3-MoE ({args.experts} experts, {args.experts_per_token} a token)" if args.experts else "Llama"
    )
    print(
        f"{kind}: {cfg.num_params() / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, MLP {args.intermediate}, vocab {args.vocab}; "
        f"batch {args.batch} x seq {args.seq}, {args.dtype}, "
        f"{'scanned' if args.scan_layers else 'unrolled'} layers; device {jax.devices()[0].device_kind}, "
        f"peak {'unknown' if peak is None else f'{peak / 1e9:.0f} GFLOP/s'}",
        flush=True,
    )
    print(f"model FLOPs per step: {model_flops / 1e9:.1f} GFLOP (training, PaLM convention)", flush=True)
    jsft_times, compile_seconds, xla_flops = bench_jsft(args, config)
    print(
        f"jsft: compile {compile_seconds:.1f} s; XLA counts {xla_flops / 1e9:.1f} GFLOP per step "
        f"({xla_flops / model_flops:.2f}x the model count; XLA counts a loop body once, so scanned layers "
        "count as one and a loss split into n chunks shows 1/n of its LM head)",
        flush=True,
    )
    jsft_rate = report("jsft", jsft_times, tokens, model_flops, peak)
    if args.skip_torch:
        return
    torch_rate = report(
        f"torch ({args.threads} threads)", bench_torch(args, config), tokens, model_flops, peak
    )
    print(f"jsft/torch tokens/s ratio: {jsft_rate / torch_rate:.2f}")


if __name__ == "__main__":
    main()
