"""Builds the encoded-data cache and prints its statistics: `jsft-prepare --config=FILE [--show=N]`.

Run it once before training (on one host, with a cache_dir every host can read) so that training
starts without tokenizing; a second run only reads the cache and prints the same statistics.
`--show=N` prints N encoded training examples with their trained tokens highlighted (in colour on
a terminal, between [[ and ]] otherwise) and per-source statistics, to check the labels before
paying for a run. `--verbose` shows the libraries' logs.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import transformers

from jsft import config, data, hf
from jsft.cli import CONFIG_USAGE, command
from jsft.errors import ConfigError, SetupError, one_line

TRAINED_COLOUR = ("\033[1;32m", "\033[0m")  # bold green
TRAINED_BRACKETS = ("[[", "]]")


def statistics(cfg, tokenizer, encoded: dict | None = None) -> dict:
    """Encodes (or reads) the train and eval mixtures; their stats plus the packing efficiency."""
    report = {}
    for name, mixer in (("train", cfg.data.mixer), ("eval", cfg.data.eval_mixer)):
        if not mixer:
            continue
        rows = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, mixer=mixer)
        if encoded is not None:
            encoded[name] = rows
        stats = dict(rows.stats)
        if cfg.data.packing:
            stats["packing"] = data.packing_report(
                rows.examples,
                batch_size=cfg.train.global_batch_size,
                max_seq_length=cfg.data.max_seq_length,
                packing=True,
                seed=cfg.train.seed,
                packer=cfg.data.packer,
            )
        report[name] = stats
    return report


def highlighted(tokenizer, token_ids: np.ndarray, trained: np.ndarray, marks: tuple[str, str]) -> str:
    """The row's text with each run of trained tokens between `marks`."""
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    pieces = []
    for run in np.split(np.arange(len(token_ids)), edges):
        if not len(run):
            continue
        text = tokenizer.decode(token_ids[run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(f"{marks[0]}{text}{marks[1]}" if trained[run[0]] else text)
    return "".join(pieces)


def pick_examples(encoded: data.EncodedData, count: int) -> list[int]:
    """Up to `count` rows, taken from the sources in turn (each source's first rows)."""
    per_source = [np.flatnonzero(encoded.row_sources == s) for s in range(len(encoded.stats["sources"]))]
    picked = []
    for depth in range(max((len(rows) for rows in per_source), default=0)):
        picked += [int(rows[depth]) for rows in per_source if depth < len(rows)]
        if len(picked) >= count:
            break
    return picked[:count]


def show(tokenizer, encoded: data.EncodedData, count: int, colour: bool) -> str:
    """`count` examples with their trained tokens highlighted."""
    marks = TRAINED_COLOUR if colour else TRAINED_BRACKETS
    sources = encoded.stats["sources"]
    lines = []
    for n, row in enumerate(pick_examples(encoded, count), start=1):
        start, end = int(encoded.row_starts[row]), int(encoded.row_starts[row + 1])
        ids, trained = np.asarray(encoded.token_ids[start:end]), np.asarray(encoded.trained[start:end])
        source = sources[int(encoded.row_sources[row])]
        lines.append(
            f"--- example {n}: row {row} of {source['source']} ({source['format']}), {len(ids)} tokens, "
            f"{int(trained[1:].sum())} trained ---"
        )
        lines.append(highlighted(tokenizer, ids, trained, marks))
    return "\n".join(lines)


def source_table(name: str, stats: dict) -> str:
    """One paragraph per source: rows, drops by reason, untrained turns, trained share, lengths."""
    lines = [f"{name}: {stats['rows']} rows of {stats['total_rows']} drawn, {stats['tokens']} tokens"]
    for s in stats["sources"]:
        drops = ", ".join(f"{reason} {n}" for reason, n in sorted(s["drops"].items())) or "none"
        turns = ", ".join(f"{reason} {n}" for reason, n in sorted(s["untrained_turns"].items())) or "none"
        lengths = " ".join(f"{p} {v}" for p, v in s["length_percentiles"].items())
        lines += [
            f"  {s['source']} ({s['format']})",
            f"    rows: {s['rows_drawn']} drawn of {s['rows_in_source']}, {s['rows_kept']} kept, "
            f"{s['truncated']} truncated",
            f"    dropped: {drops}; turns not trained: {turns}",
            f"    trained tokens: {s['trained_tokens']} of {s['tokens']} ({s['trained_share']:.1%})",
            f"    length percentiles: {lengths or 'no rows'}",
        ]
    return "\n".join(lines)


def split_show(argv: list[str]) -> tuple[list[str], int]:
    """(argv without `--show=N`, N or 0)."""
    rest, count = [], 0
    for arg in argv:
        if arg.startswith("--show="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--show takes a number of examples (1 or more), got {value!r}")
            count = int(value)
        else:
            rest.append(arg)
    return rest, count


@command(
    "jsft",
    usage=CONFIG_USAGE.format(
        prog="jsft-prepare",
        what="Builds the config's data cache and prints its statistics (--show=N: N examples marked).",
    ),
)
def main(argv: list[str]) -> None:
    try:
        argv, count = split_show(argv)
    except ConfigError as e:
        sys.exit(f"jsft: config error: {one_line(e)}")
    cfg = config.load_or_exit(["jsft-prepare", *argv])
    try:
        folder = hf.resolve_model(cfg.model.path, cfg.model.revision or None)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot load the tokenizer of {cfg.model.path}: {one_line(e)}") from None
    encoded = {}
    report = statistics(cfg, tokenizer, encoded)
    if not count:
        print(json.dumps(report, indent=1))
        return
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(show(tokenizer, encoded["train"], count, colour))
    for name, stats in report.items():
        print(source_table(name, stats))


if __name__ == "__main__":
    main()
