"""Every command in tools/ and every command line of the README, run as a user runs it (a fresh process) at
the smallest size that exercises it, each checked for a line it must print; `--help` where the smallest
run needs hardware, gigabytes or minutes (the reason is next to each). A tool added to tools/ without an
entry here, or a README command naming no existing command, fails `test_every_tool_and_readme_command_is_run`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT, TINY_DATA, TINY_MODEL, tiny_run_args
from PIL import Image

SMALL_MIXER = f"--config.data.mixer=(('{TINY_DATA}/train.jsonl', 200),)"
NO_HELD_OUT = "--config.data.eval_mixer=()"

# tool: (arguments of its smallest real run, a pattern its standard output must match)
RUNS = {
    "tools/bench/attention.py": (
        [
            "--batch=1",
            "--seq=64",
            "--heads=2",
            "--kv_heads=1",
            "--head_dim=8",
            "--repeats=1",
            "--packed_mean=16",
        ],
        r"jsft xla, blocks of \d+, packed rows: \d+\.\d+ s\n(.|\n)*\ntorch scaled_dot_product_attention: \d",
    ),
    "tools/bench/compile.py": (
        ["--layers", "1", "--hidden=64", "--vocab=64", "--seq=16", "--batch=1"],
        r"\n +1 \| +\d+\.\d s +\d+ \| +\d+\.\d s +\d+\n",
    ),
    "tools/bench/data.py": (
        [f"--tokenizer={TINY_MODEL}", "--rows=20", "--max-seq-length=256", "--batch-size=2"],
        r"speedup \d+\.\dx.*\n +first_fit +packing into \[2, 256\]: efficiency \d+\.\d%",
    ),
    "tools/bench/example_batches.py": (
        ["--config=configs/tiny.py", SMALL_MIXER, NO_HELD_OUT, "--steps=5"],
        r"example batches: \d+\.\d% of positions are data",
    ),
    "tools/bench/loss_memory.py": (
        ["--batch=1", "--seq=32", "--hidden=16", "--chunk=64"],
        r"\n +262144 +\d+\.\d +\d+\.\d +\d+\.\d +\d+\.\d\n",
    ),
    "tools/bench/memory.py": (
        ["--config=configs/tiny.py", "--devices=1"],
        r"per device: state \+ batch \d+\.\d\d GiB, temporaries \d+\.\d\d GiB, peak about \d+\.\d\d GiB",
    ),
    "tools/bench/profile_step.py": (
        ["--hidden=32", "--layers=1", "--heads=2", "--kv_heads=1", "--intermediate=64", "--vocab=384"]
        + ["--seq=32", "--batch=1", "--top=5"],
        r"step \d+\.\d+ s traced(.|\n)*== by class(.|\n)*\d+\.\d +\d+\.\d%  matmul(.|\n)*== by op\n",
    ),
    "tools/bench/step.py": (
        ["--hidden=32", "--layers=1", "--heads=2", "--kv_heads=1", "--intermediate=64", "--vocab=384"]
        + ["--seq=32", "--batch=1", "--steps=1", "--warmup=0", "--threads=1", "--experts=4"],
        r"jsft: median step .* tokens/s.*\ntorch \(1 threads\): median step .*\njsft/torch tokens/s ratio",
    ),
    # libtpu compiles the tiny config's step for a v5p-8 slice on this CPU (no TPU is used)
    "tools/tpu_check.py": (
        ["--topology=v5p-8", "--config=configs/tiny.py"],
        r"== v5p-8: 4 devices(.|\n)*memory per device \(TPU compiler\)(.|\n)*\nok +attention not by splash",
    ),
    "tools/bench/remat_frontier.py": (
        ["--topology=v5p-8", "--config=configs/tiny.py", "--policy=none", "--policy=custom:save=gate_proj"],
        r"v5p-8: policy(.*)\n  none \| \d+\.\d+ \| 0\.00 \| \d\.\d+e\+0\d \| \d\.\d{3}\n"
        r"  custom:save=gate_proj \| \d+\.\d+ \| 0\.00 \| \d\.\d+e\+0\d \| \d\.\d{3}\n",
    ),
    "tools/roofline.py": (
        ["--topology=v5p-8", "--config=configs/tiny.py"],
        r"v5p-8: peaks \d+ TFLOP/s(.|\n)*expected step \d+\.\d+ s, MFU \d+\.\d%",
    ),
}
# tool: why its smallest run is too long for the tests; its `--help` is run instead
HELP_ONLY = {
    "tools/gpu_check.py": "minutes on CPU: a ~1B model's step, 20 tiny steps and a resume (a GPU's check)",
    "tools/bench/load.py": "writes and loads a checkpoint of 0.3 GB even at --layers=1 (vocabulary 128k)",
    "tools/bench/loop.py": "~40 s on 2 cores: a model, the bare step and the whole loop compiled",
    "tools/bench/loss_reduction.py": "eight tiny runs: ~2.5 minutes on 2 cores even at --steps=1",
    "tools/bench/lora.py": "compiles an 8B model's step and times a ~60M one; neither size is a flag",
    "tools/gguf_to_hf.py": "~40 s and 0.5 GB: the 135M SmolLM2 GGUF read and dequantized by transformers "
    "(tests/test_gguf.py converts it once through jsft.gguf, which the tool calls)",
    "tools/bench/optimizers.py": "three tiny runs, one per optimizer: a minute even at --steps=1",
    "tools/bench/lm_eval_backends.py": "two backends loaded and run twice on a real model (minutes); on the "
    "tiny model the same agreement is tests/test_lm_eval.py",
}
# tools run on the short run below (they read its checkpoints or metrics), and the tiny assets' maker
ON_THE_SHORT_RUN = {"tools/convert_to_hf.py", "tools/plot_metrics.py", "tools/tiny/accuracy.py"}
MAKE_TINY = "tools/tiny/make_tiny.py"
# README commands whose runs are tested elsewhere: python -m jsft.cli.prepare (test_data_cache),
# jsft.cli.plan (test_plan), jsft.cli.tpu (test_tpu); jsft.train and jsft.cli.chat run below.
SHORT_RUN_STEPS = 2


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def test_every_tool_and_readme_command_is_run():
    tools = {str(p.relative_to(ROOT)) for p in (ROOT / "tools").rglob("*.py")}
    assert tools == set(RUNS) | set(HELP_ONLY) | ON_THE_SHORT_RUN | {MAKE_TINY}
    readme = (ROOT / "README.md").read_text()
    for path in re.findall(r"python (tools/[\w/]+\.py)", readme):
        assert path in tools, path
    for module in set(re.findall(r"python -m (jsft[\w.]*)", readme)):  # runnable with -m
        assert 'if __name__ == "__main__":' in importlib.util.find_spec(module).loader.get_source(module), (
            module
        )
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.parametrize("tool", sorted(RUNS))
def test_tool_runs_at_its_smallest_size(tool):
    args, expected = RUNS[tool]
    out = run(tool, *args).stdout
    assert re.search(expected, out), out


HELP_RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for target in sys.argv[1:]:  # a script's path, or a module's name
    sys.argv, text = [target, "--help"], io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__")
            code = "returned"
        except SystemExit as e:
            code = e.code
    results[target] = [code, text.getvalue()]
print(json.dumps(results))
"""


def test_help_of_tools_whose_run_is_too_long():
    """All in one process: each tool's imports and argument parser, without the minutes of its run."""
    results = json.loads(run("-c", HELP_RUNNER, *sorted(HELP_ONLY)).stdout.splitlines()[-1])
    for tool, (code, text) in results.items():
        assert code == 0 and text.startswith("usage: ") and "--" in text, (tool, code, text[:300])


def test_every_command_answers_help():
    """jsft-train, jsft-prepare and jsft-tpu read a config, not flags: their --help was a config error."""
    names = ("train", "prepare", "chat", "export", "plan", "tpu", "eval", "lm_eval")
    modules = [f"jsft.cli.{name}" for name in names]
    results = json.loads(run("-c", HELP_RUNNER, *modules, "jsft.train").stdout.splitlines()[-1])
    for module, (code, text) in results.items():
        assert code in (0, "returned") and text.startswith("usage: jsft-") and "--" in text, (module, text)


def test_make_tiny_rebuilds_the_committed_tiny_assets(tmp_path):
    """A copy of the script writes beside itself: the same data, tokenizer and weights, byte for byte."""
    shutil.copy(ROOT / MAKE_TINY, tmp_path)
    out = run(str(tmp_path / "make_tiny.py")).stdout
    assert re.search(r"wrote 20000 train / 500 held-out rows", out), out
    committed = ROOT / "tools" / "tiny"
    for name in [
        "data/train.jsonl",
        "data/held_out.jsonl",
        "model/model.safetensors",
        "model/tokenizer.json",
    ]:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    for name in ["model/config.json", "model/generation_config.json"]:  # but the writer's version
        made, kept = (json.loads((folder / name).read_text()) for folder in (tmp_path, committed))
        made.pop("transformers_version"), kept.pop("transformers_version")
        assert made == kept, name


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The README's `python -m jsft.train --config=configs/tiny.py`, 2 steps on 64 conversations (no
    held-out set: its evaluation would compile one more program)."""
    out = tmp_path_factory.mktemp("short") / "run"
    done = run(
        "-m",
        "jsft.train",
        *tiny_run_args(out, 64),
        f"--config.train.max_steps={SHORT_RUN_STEPS}",
        f"--config.checkpoint.every_steps={SHORT_RUN_STEPS}",
        "--config.log.every_steps=1",
    )
    return out, done.stderr


def test_train_command(short_run):
    out, stderr = short_run
    assert re.search(rf"jsft: done: step {SHORT_RUN_STEPS} of {SHORT_RUN_STEPS} in \d+\.\d s", stderr)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_chat_command_is_quiet(short_run, tmp_path):
    """The README's batch chat on the run: JSON lines on stdout, and none of the libraries' notices (Orbax
    opening the checkpoints read-only, transformers' PyTorch advisory) on stderr before them."""
    out, _ = short_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((TINY_DATA / "held_out.jsonl").read_text().splitlines(keepends=True)[:2]))
    done = run("-m", "jsft.cli.chat", f"--model={out}", f"--prompts={prompts}", "--max_new_tokens=4")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 2 and all(isinstance(r["completion"], str) and r["reference"] for r in records)
    assert not re.search(r"absl|read only|PyTorch was not found|WARNING", done.stderr), done.stderr


def test_convert_to_hf_on_the_run_with_verbose_library_logs(short_run, tmp_path):
    """`--verbose` shows the libraries' logs the commands hide by default (here Orbax's, through absl)."""
    out, _ = short_run
    args = [f"--checkpoint_dir={out}/checkpoints", f"--output_dir={tmp_path}/hf", "--verbose"]
    done = run("tools/convert_to_hf.py", *args)
    assert done.stdout.strip() == f"wrote {tmp_path}/hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    assert re.search(r"absl: Given directory is read only", done.stderr), done.stderr[-2000:]


def test_plot_metrics_of_the_run(short_run, tmp_path):
    out, _ = short_run
    done = run("tools/plot_metrics.py", str(out), f"--output={tmp_path}/plot.png")
    assert done.stdout.strip() == f"wrote {tmp_path}/plot.png"
    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG" and image.size == (1600, 850)


def test_tiny_accuracy_of_the_run(short_run):
    out, _ = short_run
    done = run("tools/tiny/accuracy.py", f"--model={out}", "--limit=6", "--batch_size=6")
    assert re.search(r"^all +\d+/6 +\d\.\d\d +\(\d+ s\)$", done.stdout, re.M), done.stdout
