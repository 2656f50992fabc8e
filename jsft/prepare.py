"""Builds the encoded-data cache and prints its statistics: `python -m jsft.prepare --config=FILE`.

Run it once before training (on one host, with a cache_dir every host can read) so that training
starts without tokenizing; a second run only reads the cache and prints the same statistics.
"""

from __future__ import annotations

import json
import logging
import sys

import transformers

from jsft import config, data
from jsft.errors import JsftError


def statistics(cfg, tokenizer) -> dict:
    """Encodes (or reads) the train and eval mixtures; their stats plus the packing efficiency."""
    report = {}
    for name, mixer in (("train", cfg.data.mixer), ("eval", cfg.data.eval_mixer)):
        if not mixer:
            continue
        encoded = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, mixer=mixer)
        stats = dict(encoded.stats)
        if cfg.data.packing:
            stats["packing"] = data.packing_report(
                encoded.examples,
                batch_size=cfg.train.global_batch_size,
                max_seq_length=cfg.data.max_seq_length,
                packing=True,
                seed=cfg.train.seed,
                packer=cfg.data.packer,
            )
        report[name] = stats
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = config.load_or_exit(argv)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.path)
        print(json.dumps(statistics(cfg, tokenizer), indent=1))
    except JsftError as e:
        sys.exit(f"jsft: error: {e}")


if __name__ == "__main__":
    main()
