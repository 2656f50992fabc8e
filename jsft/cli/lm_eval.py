"""Run lm-evaluation-harness tasks on a jsft model: `python -m jsft.lm_eval --model=<run or HF folder>
--tasks=NAME[,NAME...] [--include_path=DIR]` (or `jsft-lm-eval`; needs the `eval` extra).

Tasks come from the harness's library or, offline, from YAML files under `--include_path` (`dataset_path:
json` with local `data_files`). Prints the harness's results table; `--output` also writes its results
(and with `--log_samples` every request and response) as JSON.
"""

from __future__ import annotations

import argparse
import json

from jsft.cli import command
from jsft.errors import JsftError


@command("jsft.lm_eval")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="jsft-lm-eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a run's output_dir or checkpoints folder, or an HF folder"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tasks", required=True, help="comma-separated task or group names")
    parser.add_argument("--include_path", default=None, help="a folder of local task YAML files")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=float, default=None, help="only this many documents per task")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--output", default=None, help="also write the results here (JSON)")
    parser.add_argument("--log_samples", action="store_true", help="with --output: every request's response")
    args = parser.parse_args(argv)
    try:
        from jsft import lm_eval
    except ImportError as e:
        raise JsftError(f"lm-evaluation-harness is not installed ({e}): pip install 'jsft[eval]'") from None
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    results = lm_eval.run(
        args.model,
        tasks,
        include_path=args.include_path,
        step=args.step,
        batch_size=args.batch_size,
        limit=limit,
        num_fewshot=args.num_fewshot,
        log_samples=args.log_samples,
    )
    print(make_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
