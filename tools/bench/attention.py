"""Times one layer's attention, forward and backward, per backend that runs here, against torch SDPA.

    python tools/bench/attention.py [--batch 4 --seq 1024 --heads 8 --kv_heads 8 --head_dim 64]

Causal attention over full rows (one segment each), float32; the best of `--repeats` runs after one
untimed run. jsft's reference (`dot_product_attention`), its "xla" backend (`blocked_attention`) at
several query block sizes, `jax.nn.dot_product_attention(implementation="xla")`, and PyTorch's
`scaled_dot_product_attention` on the same numbers. The "xla" backend is timed again on packed rows
(segments of random lengths around `--packed_mean` tokens, as packing leaves them): what the segment
mask costs.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models import attention


def best_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def packed_segments(rng: np.random.Generator, rows: int, seq: int, mean: int) -> np.ndarray:
    """[rows, seq] segment ids 1, 2, ... of lengths drawn around `mean`, the last one cut at the row end."""
    out = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start, segment = 0, 1
        while start < seq:
            n = int(rng.integers(mean // 4, 2 * mean))
            out[r, start : start + n] = segment
            start, segment = start + n, segment + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--packed_mean", type=int, default=200, help="mean segment length of packed rows")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, t, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q, k, v = (rng.normal(size=(b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    causal = jnp.ones((b, t), jnp.int32)
    packed = jnp.asarray(packed_segments(rng, b, t, args.packed_mean))
    scale = d**-0.5
    backends = {
        "jsft reference": lambda q, k, v: attention.dot_product_attention(q, k, v, causal, scale=scale),
        **{
            f"jsft xla, blocks of {block}{suffix}": lambda q, k, v, block=block, seg=seg: (
                attention.blocked_attention(q, k, v, seg, scale=scale, block=block)
            )
            for block in (64, 128, 256)
            for suffix, seg in (("", causal), (", packed rows", packed))
        },
        "jax.nn.dot_product_attention xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"
        ),
    }
    print(f"batch {b}, seq {t}, heads {h}/{kv} of {d}, float32, {jax.devices()[0].device_kind}; fwd+bwd")
    for name, fn in backends.items():
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
        seconds = best_seconds(lambda grad=grad: jax.block_until_ready(grad(q, k, v)), args.repeats)
        print(f"{name}: {seconds:.3f} s", flush=True)

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def torch_step():
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=h != kv)
        out.sum().backward()

    print(f"torch scaled_dot_product_attention: {best_seconds(torch_step, args.repeats):.3f} s")


if __name__ == "__main__":
    main()
