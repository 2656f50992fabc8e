"""Benchmarks data preparation: fast versus incremental masking, and packing versus padding.

    python tools/bench/data.py [--tokenizer=FOLDER] [--template=NAME] [--rows=400]

Conversations are built from the real ShareGPT and Alpaca files in ../shared/realdata (the tiny
training set where absent) with a long-tailed mix of lengths like instruction-tuning sets have:
a geometric number of turns, and replies made of a log-normal number of real answers.
Both maskers encode the same rows with the same tokenizer; the packers run over the encoded lengths.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import time

import numpy as np
import transformers

from jsft.data import ChatEncoder, pipeline, sources

ROOT = pathlib.Path(__file__).resolve().parents[2]
REALDATA = ROOT.parent / "shared" / "realdata"
TINY = ROOT / "tools" / "tiny"


def texts() -> tuple[list[str], list[str]]:
    """(questions, answers) from the real data sets, or the tiny one."""
    questions, answers = [], []
    if (REALDATA / "datasets").is_dir():
        for row in json.loads((REALDATA / "datasets" / "llama-factory" / "alpaca_en_demo.json").read_text()):
            questions.append(f"{row['instruction']}\n\n{row['input']}".strip())
            answers.append(row["output"])
        for row in json.loads((REALDATA / "datasets" / "fastchat" / "dummy_conversation.json").read_text()):
            for message in sources.row_messages(row):
                (answers if message["role"] == "assistant" else questions).append(message["content"])
    else:
        for line in (TINY / "data" / "train.jsonl").read_text().splitlines():
            for message in json.loads(line)["messages"]:
                (answers if message["role"] == "assistant" else questions).append(message["content"])
    return questions, answers


def long_tailed_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    questions, answers = texts()
    conversations = []
    for _ in range(count):
        messages = (
            [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        )
        turns = min(1 + int(rng.expovariate(0.5)), 10)
        for _ in range(turns):
            parts = max(1, min(int(rng.lognormvariate(0.7, 1.0)), 20))
            messages.append({"role": "user", "content": rng.choice(questions)})
            messages.append({"role": "assistant", "content": "\n\n".join(rng.sample(answers, parts))})
        conversations.append(messages)
    return conversations


def time_encoder(encode, conversations) -> tuple[float, int, list[int]]:
    started = time.perf_counter()
    lengths = [len(encode(m)["input_ids"]) for m in conversations]
    return time.perf_counter() - started, sum(lengths), lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_tokenizer = REALDATA / "tokenizers" / "qwen2.5-instruct"
    parser.add_argument(
        "--tokenizer", default=str(default_tokenizer if default_tokenizer.is_dir() else TINY / "model")
    )
    parser.add_argument("--template", default="", help="'' for the tokenizer's own, tulu, chatml or a file")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    conversations = long_tailed_conversations(args.rows)
    encoder = ChatEncoder(tokenizer, args.template or None)
    encoder.encode(conversations[0])  # warm up the template compilation
    fast_s, tokens, lengths = time_encoder(encoder.encode, conversations)
    slow_s, slow_tokens, _ = time_encoder(encoder.encode_incremental, conversations)
    assert tokens == slow_tokens
    print(
        f"tokenizer {args.tokenizer}, template {args.template or 'own'}, {len(conversations)} conversations"
    )
    print(
        f"  lengths (tokens): mean {np.mean(lengths):.0f}, p50 {np.percentile(lengths, 50):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {max(lengths)}"
    )
    for name, seconds in (("fast (verified)", fast_s), ("incremental", slow_s)):
        print(
            f"  {name:16s} {len(conversations) / seconds:8.1f} conversations/s "
            f"{tokens / seconds:10.0f} tokens/s"
        )
    print(
        f"  speedup {slow_s / fast_s:.1f}x; the fast method fell back to the incremental one "
        f"{encoder.fallbacks} times"
    )

    examples = pipeline._LengthStubs(np.minimum(np.array(lengths) - 1, args.max_seq_length))
    for packer in pipeline.PACKER_CLASSES:
        started = time.perf_counter()
        report = pipeline.packing_report(
            examples,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            packing=True,
            seed=0,
            packer=packer,
        )
        print(
            f"  {packer:9s} packing into [{args.batch_size}, {args.max_seq_length}]: efficiency "
            f"{report['efficiency']:.1%} in {report['batches']} batches "
            f"({time.perf_counter() - started:.1f} s); "
            f"padding each batch to its longest: {report['padded_efficiency']:.1%}"
        )


if __name__ == "__main__":
    main()
