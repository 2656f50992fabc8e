"""Greedy held-out accuracy per task of a tiny run, with jsft's own generation (`jsft.inference`, as in chat).

    python tools/tiny/accuracy.py --model=runs/tiny [--prompts=tools/tiny/data/held_out.jsonl] [--limit=N]

Prints one line per task (`count  11/12  0.92`) and the total; `--output` also writes every record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jsft import inference
from jsft.cli import command

HELD_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "held_out.jsonl")


@command("accuracy")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run's output_dir, its checkpoints, or an HF folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompts", default=HELD_OUT)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--output", default=None, help="also write the records here (JSON lines)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = inference.load(args.model, args.step)
    prompts = inference.read_prompts(args.prompts)[: args.limit]
    sampling = inference.sampling(model, max_new_tokens=16)
    records = list(inference.generate_all(model, prompts, sampling, args.batch_size))
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    scores = inference.exact_match_by_task(records)
    for task, (right, asked) in scores.items():
        print(f"{task or '(none)':8} {right:4}/{asked:<4} {right / asked:.2f}")
    right, asked = (sum(x) for x in zip(*scores.values(), strict=True))
    print(f"{'all':8} {right:4}/{asked:<4} {right / asked:.2f}   ({time.perf_counter() - start:.0f} s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
