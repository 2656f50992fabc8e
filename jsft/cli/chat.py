"""Talk to a model: `python -m jsft.cli.chat --model=<run or checkpoint dir, or HF folder>` (or `jsft-chat`).

Interactive (the default): each line you type is a user turn; the reply streams token by token and
the conversation is kept (`/reset` clears it, `/quit` or end of input leaves). With `--prompts=FILE`
(JSON lines of `{"messages": [...]}` or `{"prompt": "..."}`) every prompt is generated in batches
and written as JSON lines (`messages`, `completion`, and `reference` when the file's conversation
ended with an assistant turn). The model's own chat template is applied: the HF folder's, or the one
a checkpoint was trained with (saved in it). Greedy unless `--temperature` > 0. `--verbose` shows the
libraries' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TextIO

from jsft import inference
from jsft.cli import command
from jsft.errors import JsftError
from jsft.generate import Sampling


def interactive(model: inference.ChatModel, sampling: Sampling, lines: TextIO, out: TextIO) -> None:
    """A conversation on a terminal: replies stream as they are decoded."""
    messages: list[dict] = []
    out.write("jsft chat: /reset starts over, /quit leaves\n")
    while True:
        out.write("> ")
        out.flush()
        line = lines.readline()
        if not line or line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        tokens: list[int] = []
        shown = ""
        for token in model.generator.stream(model.params, model.encode(messages), sampling, base=model.base):
            tokens.append(token)
            text = model.decode(tokens, sampling.stop_ids)
            out.write(text[len(shown) :])
            out.flush()
            shown = text
        out.write("\n")
        messages.append({"role": "assistant", "content": shown})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jsft-chat", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a run's output_dir or checkpoints folder, or an HF folder"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--prompts", default=None, help="JSONL prompts to batch-generate (default: interactive)"
    )
    parser.add_argument("--output", default=None, help="where batch results go (default: stdout)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--stop", default="", help="comma-separated stop tokens (default: the model's EOS)")
    parser.add_argument("--no_cache", action="store_true", help="full forward per token (the slow reference)")
    return parser.parse_args(argv)


@command("jsft.chat")
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise JsftError(f"--batch_size must be at least 1, got {args.batch_size}")
    prompts = inference.read_prompts(args.prompts) if args.prompts else None
    model = inference.load(args.model, args.step)
    sampling = inference.sampling(
        model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=args.stop,
        use_cache=not args.no_cache,
    )
    if prompts is None:
        interactive(model, sampling, sys.stdin, sys.stdout)
        return
    with open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout) as out:
        for record in inference.generate_all(model, prompts, sampling, args.batch_size):
            out.write(json.dumps(record) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
