"""Charts of jsft runs: python tools/plot_metrics.py <output_dir> [more output_dirs] [--output=FILE.png]

Train and held-out loss, learning rate, gradient norm, tokens/s and MFU over steps, one colour per run
(see `jsft.plots`). Default output: metrics.png in the first run's folder.
"""

from __future__ import annotations

import argparse

from etils import epath

from jsft import plots
from jsft.cli import command


@command("plot_metrics")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", help="run output_dirs (each with a metrics.jsonl)")
    parser.add_argument("--output", default=None, help="PNG path (default: <first output_dir>/metrics.png)")
    args = parser.parse_args(argv)
    output = args.output or str(epath.Path(args.output_dirs[0]) / "metrics.png")
    print(f"wrote {plots.plot_runs(args.output_dirs, output)}")


if __name__ == "__main__":
    main()
