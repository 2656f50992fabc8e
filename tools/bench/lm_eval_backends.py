"""jsft's lm-evaluation-harness backend against the harness's own `hf` backend on one model, side by side in
one run: agreement (every log-likelihood, accuracies, greedy strings) and wall times.

    python tools/bench/lm_eval_backends.py --model=runs/smollm2-hf [--rows=16] [--batch_size=8]

The model is an HF folder (SmolLM2-135M-Instruct: `python tools/gguf_to_hf.py smollm2 runs/smollm2-hf`).
Three local tasks are written to a temporary folder and read offline: multiple choice (short general
knowledge questions, 4 choices), greedy generation (one-line arithmetic answers) and rolling
log-likelihood. Both backends run in float32 on the CPU; each is loaded once and evaluated twice, the first
pass with jsft's compiles, the second warm. (Not named lm_eval.py: a script's folder comes first on
sys.path, and that name would hide the harness's package.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from jsft import inference
from jsft import lm_eval as backend
from jsft.cli import command

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"]),
    ("How many legs does a spider have?", ["eight", "six", "four", "ten"]),
    ("What color is the sky on a clear day?", ["blue", "green", "red", "yellow"]),
    ("Which planet is known as the Red Planet?", ["Mars", "Venus", "Jupiter", "Saturn"]),
    ("What do bees make?", ["honey", "milk", "silk", "wool"]),
    ("What is frozen water called?", ["ice", "steam", "sand", "glass"]),
    ("Which animal is known as the king of the jungle?", ["lion", "mouse", "cow", "frog"]),
    ("How many days are in a week?", ["seven", "five", "ten", "twelve"]),
    ("What is the largest ocean on Earth?", ["Pacific", "Atlantic", "Indian", "Arctic"]),
    ("Which gas do plants take in from the air?", ["carbon dioxide", "helium", "neon", "argon"]),
    ("What is the opposite of hot?", ["cold", "tall", "fast", "loud"]),
    ("Which fruit is yellow and curved?", ["banana", "apple", "grape", "cherry"]),
    ("What is the capital of Japan?", ["Tokyo", "Beijing", "Seoul", "Bangkok"]),
    ("How many hours are in a day?", ["24", "12", "60", "100"]),
    ("What do you use to write on a blackboard?", ["chalk", "soap", "bread", "rope"]),
    ("Which season comes after winter?", ["spring", "autumn", "summer", "night"]),
]


def write_tasks(folder: str, rows: int) -> list[str]:
    """The three local tasks (the first `rows` documents each), as jsft task files and harness YAML."""
    shift = np.random.default_rng(0)
    choice, generate, texts = [], [], []
    for question, choices in QUESTIONS[:rows]:
        order = list(shift.permutation(len(choices)))
        choice.append(
            {
                "prompt": f"Question: {question}\nAnswer:",
                "choices": [choices[i] for i in order],
                "answer": order.index(0),
            }
        )
    for i in range(rows):
        a, b = 3 + 7 * i % 40, 2 + 5 * i % 30
        generate.append({"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "answer": f" {a + b}"})
        texts.append({"prompt": f"{QUESTIONS[i % len(QUESTIONS)][0]} The answer is", "answer": "simple."})
    for name, data in (("mc", choice), ("gen", generate), ("text", texts)):
        with open(f"{folder}/{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    backend.harness_task({"name": "bench_mc", "path": f"{folder}/mc.jsonl", "kind": "choice"}, folder)
    spec = {"name": "bench_gen", "path": f"{folder}/gen.jsonl", "kind": "generate", "chat": False}
    backend.harness_task(spec | {"max_new_tokens": 16, "stop": ["\n"]}, folder)
    rolling = {
        "task": "bench_rolling",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"{folder}/text.jsonl"}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{prompt}} {{answer}}",
        "metric_list": [{"metric": "word_perplexity"}],
    }
    with open(f"{folder}/rolling.yaml", "w") as f:
        json.dump(rolling, f)
    return ["bench_mc", "bench_gen", "bench_rolling"]


def compare(ours: dict, theirs: dict, tasks: list[str]) -> list[str]:
    """Lines: the largest log-likelihood difference, accuracies and greedy strings of the two backends."""
    lines = []
    for task in tasks:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        if task == "bench_gen":
            same = sum(x["resps"] == y["resps"] for x, y in zip(a, b, strict=True))
            lines.append(f"{task}: greedy strings equal in {same} of {len(a)}")
            first = a[0]["resps"][0][0]
            lines.append(f"  e.g. {a[0]['arguments'][0][0]!r} -> {first!r}")
            metrics = ["exact_match,none"]
        else:
            pick = (lambda r: r[0][0]) if task == "bench_mc" else (lambda r: r[0])
            diff = max(
                abs(pick(p) - pick(q))
                for x, y in zip(a, b, strict=True)
                for p, q in zip(x["resps"], y["resps"], strict=True)
            )
            lines.append(f"{task}: max |loglikelihood difference| {diff:.2e} over {len(a)} documents")
            metrics = ["acc,none", "acc_norm,none"] if task == "bench_mc" else ["word_perplexity,none"]
        for metric in metrics:
            x, y = ours["results"][task][metric], theirs["results"][task][metric]
            lines.append(f"  {metric.split(',')[0]}: jsft {x:.4f}  hf {y:.4f}")
    return lines


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


@command("bench_lm_eval")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HF model folder")
    parser.add_argument("--rows", type=int, default=16, help=f"documents per task (at most {len(QUESTIONS)})")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    from lm_eval import evaluator as harness
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as folder:
        tasks = write_tasks(folder, min(args.rows, len(QUESTIONS)))
        manager = TaskManager(include_path=folder)

        def evaluate(lm):
            return harness.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)

        jsft_lm, jsft_load = timed(
            lambda: backend.JsftLM(inference.load(args.model), batch_size=args.batch_size)
        )
        ours, jsft_first = timed(lambda: evaluate(jsft_lm))
        _, jsft_warm = timed(lambda: evaluate(jsft_lm))
        hf_lm, hf_load = timed(
            lambda: HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size)
        )
        theirs, hf_first = timed(lambda: evaluate(hf_lm))
        _, hf_warm = timed(lambda: evaluate(hf_lm))
    print("\n".join(compare(ours, theirs, tasks)))
    print(f"{'':8}{'load':>8}{'first pass':>12}{'warm pass':>11}")
    print(f"{'jsft':8}{jsft_load:7.1f}s{jsft_first:11.1f}s{jsft_warm:10.1f}s")
    print(f"{'hf':8}{hf_load:7.1f}s{hf_first:11.1f}s{hf_warm:10.1f}s")
    print(f"jsft/hf wall time: first pass {jsft_first / hf_first:.2f}, warm pass {jsft_warm / hf_warm:.2f}")


if __name__ == "__main__":
    main()
