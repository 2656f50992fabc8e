"""plots.plot_runs: one PNG of two runs' metrics (opened and checked), and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jsft import plots
from jsft.errors import JsftError


def write_run(folder, loss_scale: float, with_mfu: bool):
    """A metrics.jsonl as a run writes it: train lines every 10 steps, held-out lines, a samples line."""
    folder.mkdir()
    lines = [{"step": 0, "eval_loss": 6.0 * loss_scale}, {"step": 0, "samples": [], "sample_seconds": 1.5}]
    for step in range(10, 101, 10):
        line = {
            "step": step,
            "loss": loss_scale * 6 / step**0.5,
            "lr": 1e-3 * (1 - step / 100),
            "grad_norm": 1.0,
        }
        lines.append(line | {"tokens_per_sec": 900.0 + step, **({"mfu": 0.3} if with_mfu else {})})
        if step % 50 == 0:
            lines.append({"step": step, "eval_loss": loss_scale * 7 / step**0.5})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(folder)


def test_two_runs_side_by_side(tmp_path):
    runs = [write_run(tmp_path / "a", 1.0, True), write_run(tmp_path / "b", 0.5, False)]
    series = plots.read_metrics(runs[0])
    assert series["loss"][0] == list(range(10, 101, 10)) and series["eval_loss"][0] == [0, 50, 100]
    assert "samples" not in series and series["sample_seconds"] == ([0], [1.5])

    out = plots.plot_runs(runs, str(tmp_path / "plot.png"))
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1600, 850)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # matplotlib's first two colours (C0 blue, C1 orange) draw the two runs
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - colour).sum(axis=1) < 30).sum() > 500, colour


def test_run_names_disambiguate_same_folder_names(tmp_path):
    assert plots.run_names(["x/run", "y/run", "z/other"]) == ["x/run", "y/run", "other"]


def test_errors_are_one_line(tmp_path):
    with pytest.raises(JsftError, match="has no metrics.jsonl"):
        plots.plot_runs([str(tmp_path)], str(tmp_path / "p.png"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(JsftError, match=r"metrics.jsonl:2: not a JSON line"):
        plots.read_metrics(str(tmp_path))
