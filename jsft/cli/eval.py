"""Score a model on tasks: `python -m jsft.eval --model=<run or HF folder> --tasks=tasks.json` (jsft-eval).

`--tasks` is a JSON file holding a list of tasks, or that list inline: each a dict of the grammar in
`jsft.config.EVAL_TASK_KEYS` (the same as `log.eval_tasks`), e.g.
`[{"name": "add", "path": "add.jsonl", "kind": "generate", "score": "final_answer"}]`. Prints one line per
task and score (`add  final_answer  0.4500  (n=100)`); `--output` also writes the scores and every row's
record as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from jsft import evaluate, inference
from jsft.cli import command
from jsft.errors import JsftError


def read_task_list(value: str) -> list:
    """The tasks of `--tasks`: a JSON file's list, or a JSON list given inline."""
    text = value
    if not value.lstrip().startswith("["):
        if not os.path.isfile(value):
            raise JsftError(f"--tasks={value} is neither a JSON list nor a file")
        with open(value) as f:
            text = f.read()
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as e:
        raise JsftError(f"--tasks {value}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(tasks, list):
        raise JsftError(f"--tasks {value}: expected a JSON list of tasks, got {type(tasks).__name__}")
    return tasks


def format_scores(scores: dict[str, dict]) -> list[str]:
    return [
        f"{task:12} {metric:12} {value:.4f}  (n={values['count']})"
        for task, values in scores.items()
        for metric, value in values.items()
        if metric not in ("count", "records")
    ]


@command("jsft.eval")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="jsft-eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a run's output_dir or checkpoints folder, or an HF folder"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tasks", required=True, help="a JSON file with a list of tasks, or the list inline")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", default=None, help="also write scores and per-row records here (JSON)")
    args = parser.parse_args(argv)
    tasks = evaluate.load_tasks(read_task_list(args.tasks))  # every row checked before the model loads
    started = time.perf_counter()
    model = inference.load(args.model, args.step)
    scores = evaluate.Evaluator.for_model(model, args.batch_size).score(model.params, model.base, tasks)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(scores, f, indent=1)
    print("\n".join(format_scores(scores)))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
