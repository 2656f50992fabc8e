"""Greedy held-out accuracy per task of a tiny run, scored by `jsft.evaluate` (as `python -m jsft.eval`).

    python tools/tiny/accuracy.py --model=runs/tiny [--prompts=tools/tiny/data/held_out.jsonl] [--limit=N]

Prints one line per task (`count  11/12  0.92`) and the total; `--output` also writes every record. The
held-out file is one generate task scored by exact match; its rows are counted per task here, a task being
the user turn up to its first ':' (`count: abc` -> `count`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from jsft import evaluate, inference
from jsft.cli import command

HELD_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "held_out.jsonl")


@command("accuracy")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run's output_dir, its checkpoints, or an HF folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompts", default=HELD_OUT)
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--output", default=None, help="also write the records here (JSON lines)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    task = {"name": "held_out", "path": args.prompts, "kind": "generate", "max_new_tokens": 16}
    tasks = evaluate.load_tasks([task | {"limit": args.limit}])
    model = inference.load(args.model, args.step)
    evaluator = evaluate.Evaluator.for_model(model, args.batch_size)
    records = evaluator.score(model.params, model.base, tasks)["held_out"]["records"]
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    right, asked = Counter(), Counter()
    for record in records:
        task = record["messages"][-1]["content"].split(":", 1)[0].strip()
        right[task] += int(record["exact_match"])
        asked[task] += 1
    for task in sorted(asked):
        print(f"{task:8} {right[task]:4}/{asked[task]:<4} {right[task] / asked[task]:.2f}")
    total, count = sum(right.values()), sum(asked.values())
    print(f"{'all':8} {total:4}/{count:<4} {total / count:.2f}   ({time.perf_counter() - start:.0f} s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
