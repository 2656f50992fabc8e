"""Padding of `train.batch_unit="examples"` on a real length mix, against packed rows and plain padding.

    python tools/bench/example_batches.py --config=configs/tiny.py [--config.data.mixer=...] \
        [--config.train.global_batch_size=128] [--config.data.max_seq_length=4096] [--steps=200]

Encodes (or reads from the cache) the config's mixture, then over `--steps` batches reports the share of
computed positions that hold data: for example batches (N conversations per step, packed, the row count
rounded up to a bucket), for `batch_unit="rows"` (Grain's packer), and for padding each conversation of
a batch to the longest. Also the distinct row counts (compiled shapes) the example batches need.
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
import transformers

from jsft import config, data, hf
from jsft.data import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--row_multiple", type=int, default=1, help="data x fsdp x grad_accum / processes")
    args, config_args = parser.parse_known_args()
    cfg = config.load_or_exit([sys.argv[0], *config_args])
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf.resolve_model(cfg.model.path))
    examples = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed).examples
    lengths = pipeline.example_lengths(examples)
    n, length = cfg.train.global_batch_size, cfg.data.max_seq_length
    steps = min(args.steps, len(examples) // n)
    stream = iter(
        pipeline.example_batches(
            examples, batch_size=n, max_seq_length=length, seed=0, row_multiple=args.row_multiple
        )
    )
    shapes = collections.Counter()
    tokens = positions = unbucketed = 0
    for _ in range(steps):
        batch = next(stream)
        rows = batch["segment_ids"].shape[0]
        shapes[rows] += 1
        tokens += int(np.count_nonzero(batch["segment_ids"]))
        positions += rows * length
        unbucketed += int(np.count_nonzero(batch["segment_ids"].any(axis=1))) * length
    rows_mode = data.packing_report(examples, batch_size=n, max_seq_length=length, packing=True, seed=0)
    print(
        f"{len(examples)} conversations, mean {lengths.mean():.0f} tokens (p50 {np.median(lengths):.0f}, "
        f"p99 {np.percentile(lengths, 99):.0f}); {steps} steps of {n} conversations, rows of {length}"
    )
    print(
        f"example batches: {100 * tokens / positions:.1f}% of positions are data "
        f"({100 * tokens / unbucketed:.1f}% before bucketing the row count); "
        f"row counts {dict(sorted(shapes.items()))}"
    )
    print(
        f"packed rows (batch_unit=rows): {100 * rows_mode['efficiency']:.1f}%; "
        f"padding each batch to its longest: {100 * rows_mode['padded_efficiency']:.1f}%"
    )


if __name__ == "__main__":
    main()
