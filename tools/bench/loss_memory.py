"""Peak temporary memory of the loss and its gradient, plain vs chunked, as the vocabulary grows.

    python tools/bench/loss_memory.py [--batch=2] [--seq=2048] [--hidden=512] [--chunk=512]

Reads XLA's compiled memory analysis (no execution), so it runs on CPU for any size.
"""

from __future__ import annotations

import argparse

from jsft import loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument(
        "--chunk", type=int, default=None, help="default: sized by loss.CPU_LOGITS_BUDGET_BYTES"
    )
    args = parser.parse_args()
    chunk = args.chunk or f"auto ({loss.CPU_LOGITS_BUDGET_BYTES // 2**20} MiB of logits)"
    print(f"batch {args.batch} x seq {args.seq}, hidden {args.hidden}, chunk {chunk}; temp MiB of loss+grad")
    print("(the chunked scan carries the [hidden, vocab] kernel gradient; 'beyond it' excludes it)")
    print(f"{'vocab':>8} {'plain':>10} {'chunked':>10} {'beyond it':>10} {'[B,T,V] f32':>12}")
    for vocab in (8_192, 32_768, 131_072, 262_144):
        measured = loss.gradient_temp_bytes(args.batch, args.seq, args.hidden, vocab, args.chunk)
        plain, chunked = measured["plain"], measured["chunked"]
        logits, kernel = args.batch * args.seq * vocab * 4, args.hidden * vocab * 4
        row = [plain, chunked, chunked - kernel, logits]
        print(f"{vocab:>8} " + " ".join(f"{v / 2**20:>10.1f}" for v in row[:3]) + f" {logits / 2**20:>12.1f}")


if __name__ == "__main__":
    main()
