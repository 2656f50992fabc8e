"""PNG charts of one or more runs' `metrics.jsonl`: losses, learning rate, gradient norm, throughput, MFU.

Each run gets one colour in every panel, so runs compare side by side; the loss panel draws the train
loss solid and the held-out loss dashed with markers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from etils import epath

from jsft.errors import JsftError

# (panel title, [(metrics.jsonl key, line style)])
PANELS = (
    ("loss (train solid, held-out dashed)", (("loss", "-"), ("eval_loss", "--o"))),
    ("learning rate", (("lr", "-"),)),
    ("gradient norm", (("grad_norm", "-"),)),
    ("tokens / s", (("tokens_per_sec", "-"),)),
    ("MFU", (("mfu", "-"),)),
)

Series = dict[str, tuple[list[int], list[float]]]


def read_metrics(output_dir: str) -> Series:
    """{key: (steps, values)} of every numeric key in a run's metrics.jsonl."""
    path = epath.Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        raise JsftError(f"{output_dir} has no metrics.jsonl: is it a jsft run's output_dir?")
    series: Series = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise JsftError(f"{path}:{number}: not a JSON line") from None
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return series


def run_names(output_dirs: Sequence[str]) -> list[str]:
    """Each run's folder name, or its whole path where two folder names are the same."""
    names = [os.path.basename(os.path.normpath(d)) for d in output_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, output_dirs, strict=True)]


def plot_runs(output_dirs: Sequence[str], output: str) -> str:
    """Writes the runs' charts as one PNG at `output` (local or object store); returns `output`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise JsftError("plotting needs matplotlib: pip install 'jsft[plots]'") from None
    if not output_dirs:
        raise JsftError("give at least one run output_dir to plot")
    runs = [read_metrics(d) for d in output_dirs]
    figure, axes = pyplot.subplots(2, 3, figsize=(16, 8.5), squeeze=False)
    for panel, (title, keys) in zip(axes.flat, PANELS, strict=False):
        panel.set_title(title)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
        for colour, (name, series) in enumerate(zip(run_names(output_dirs), runs, strict=True)):
            for key, style in keys:
                if key in series:
                    steps, values = series[key]
                    label = name if style == "-" else f"{name} (held-out)"
                    panel.plot(steps, values, style, color=f"C{colour}", label=label, markersize=3)
        if panel.lines:
            panel.legend(fontsize="small")
        else:
            panel.text(
                0.5,
                0.5,
                "not logged (MFU needs a known device peak: log.peak_flops)"
                if "MFU" in title
                else "not logged",
                ha="center",
                va="center",
                transform=panel.transAxes,
            )
    axes.flat[-1].axis("off")
    figure.tight_layout()
    local = output if "://" not in output else os.path.join(os.environ.get("TMPDIR", "/tmp"), "jsft-plot.png")
    figure.savefig(local, dpi=100)
    pyplot.close(figure)
    if local != output:
        epath.Path(output).write_bytes(epath.Path(local).read_bytes())
    return output
