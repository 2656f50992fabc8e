"""Config files and command-line overrides: one schema, clear one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from jsft import config


def _load(*args):
    return config.load(["prog", *args])


def test_tiny_config_and_override():
    cfg = _load(f"--config={ROOT}/configs/tiny.py", "--config.optim.lr=1e-5", "--config.mesh.fsdp=1")
    assert cfg.optim.lr == 1e-5
    assert cfg.model.path.endswith("tools/tiny/model")


def test_tulu_config_is_the_published_recipe():
    cfg = _load(f"--config={ROOT}/configs/tulu.py")
    assert cfg.model.path == "meta-llama/Llama-3.1-8B"
    assert cfg.data.mixer == (("allenai/tulu-3-sft-mixture", 1.0),)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        5e-6,
        "linear",
        0.03,
        0.0,
    )
    assert (cfg.train.epochs, cfg.data.max_seq_length, cfg.data.chat_template) == (2, 4096, "tulu")
    assert cfg.train.loss_reduction == "sum"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.optim.lrr=1"],
            "unknown config key 'optim.lrr' in the command line (did you mean 'optim.lr'?)",
        ),
        (["--config.nope=1"], "unknown config key 'nope'"),
        (["--config.optim.lr=abc"], "bad config override"),
        (["--config.train.loss_reduction=median"], "train.loss_reduction must be 'mean' or 'sum'"),
        (["--config.train.grad_accum_steps=3"], "not divisible by train.grad_accum_steps=3"),
    ],
)
def test_bad_overrides(args, message):
    with pytest.raises(config.ConfigError, match=None) as err:
        _load(f"--config={ROOT}/configs/tiny.py", *args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        _load(f"--config={tmp_path}/missing.py")
    typo = tmp_path / "typo.py"
    typo.write_text(
        "from jsft.config import default_config\n"
        "def get_config():\n    c = default_config()\n    c.optim.learning_rate = 1.0\n    return c\n"
    )
    with pytest.raises(config.ConfigError, match="unknown config key 'optim.learning_rate'"):
        _load(f"--config={typo}")


def test_cli_reports_one_line_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "jsft.train", f"--config={ROOT}/configs/tiny.py", "--config.optim.lrr=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert (
        out.stderr.strip().splitlines()[-1].startswith("jsft: config error: unknown config key 'optim.lrr'")
    )
    assert "Traceback" not in out.stderr


def test_batch_that_does_not_split_over_the_mesh_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jsft.train",
            f"--config={ROOT}/configs/tiny.py",
            f"--config.output_dir={tmp_path}",
            "--config.train.global_batch_size=12",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )  # tests run on 8 simulated devices: 12 rows do not split over them
    assert out.returncode != 0
    assert "must split evenly over data x fsdp = 8 devices" in out.stderr.strip().splitlines()[-1]
