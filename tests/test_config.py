"""Config files and command-line overrides: one schema, clear one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import pytest
from conftest import ROOT

from jsft import config, errors, models, optim, sharding

TINY = f"{ROOT}/configs/tiny.py"


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


def test_tulu_70b_config_is_the_published_recipe():
    """open-instruct's command for Llama-3.1-Tulu-3-70B-SFT: as the 8B's but lr 2e-6 and seed 456."""
    cfg = _load(f"--config={ROOT}/configs/tulu_70b.py")
    assert cfg.model.path == "meta-llama/Llama-3.1-70B"
    assert cfg.data.mixer == (("allenai/tulu-3-sft-mixture", 1.0),)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        2e-6,
        "linear",
        0.03,
        0.0,
    )
    assert (cfg.train.batch_unit, cfg.train.global_batch_size, cfg.train.grad_accum_steps) == (
        "examples",
        128,
        1,
    )
    assert (cfg.train.epochs, cfg.data.max_seq_length, cfg.data.chat_template) == (2, 4096, "tulu")
    assert (cfg.train.loss_reduction, cfg.train.seed, cfg.optim.clip_grad_norm) == ("sum", 456, 0.0)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.py")))
def test_every_shipped_config_loads(name):
    cfg = _load(f"--config={ROOT}/configs/{name}")
    assert cfg.data.max_seq_length > 0 and cfg.optim.lr > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.optim.lrr=1"],
            "unknown config key 'optim.lrr' in the command line (did you mean 'optim.lr'?)",
        ),
        (["--config.nope=1"], "unknown config key 'nope'"),
        (["--config.optim.lr=abc"], "bad config override"),
        (["--config.train.loss_reduction=median"], "train.loss_reduction: 'median' is not one of mean, sum"),
        (["--config.train.grad_accum_steps=3"], "not divisible by train.grad_accum_steps=3"),
    ],
)
def test_bad_overrides(args, message):
    with pytest.raises(config.ConfigError, match=None) as err:
        _load(f"--config={ROOT}/configs/tiny.py", *args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_numeric_key_has_a_range():
    defaults = config._paths(config.default_config())
    numeric = {k for k, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(config.RANGES)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-0.001", "optim.lr=-0.001 is out of range: it must be > 0"),
        ("optim.lr=nan", "optim.lr=nan is out of range"),
        ("optim.b2=1.5", "optim.b2=1.5 is out of range: it must be in [0, 1)"),
        ("optim.eps=0", "optim.eps=0.0 is out of range: it must be > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is out of range: it must be >= 0"),
        ("lora.dropout=2", "lora.dropout=2.0 is out of range: it must be in [0, 1)"),
        ("log.every_steps=-5", "log.every_steps=-5 is out of range: it must be >= 1"),
        ("checkpoint.every_minutes=-1", "checkpoint.every_minutes=-1.0 is out of range"),
        ("mesh.fsdp=0", "mesh.fsdp=0 is out of range: it must be >= -1 and not 0"),
        ("data.max_bad_fraction=1.5", "data.max_bad_fraction=1.5 is out of range: it must be in [0, 1]"),
    ],
)
def test_numbers_out_of_range_are_one_line_errors(override, message):
    """Each numeric key is checked against its declared range before anything runs (a negative lr once
    trained 20 steps the wrong way and exited 0)."""
    with pytest.raises(config.ConfigError) as err:
        _load(f"--config={TINY}", f"--config.{override}")
    assert message in str(err.value) and str(err.value).endswith(f"({TINY})")
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
    assert "must split evenly over data x fsdp x expert = 8 devices" in out.stderr.strip().splitlines()[-1]


def test_choice_table_declares_every_choice_valued_key():
    table = config.choices()
    assert table["data.packer"] == ("first_fit", "best_fit")
    assert table["model.dtype"] == ("auto", "float32", "bfloat16")
    assert table["model.param_dtype"] == ("float32", "bfloat16")
    assert table["model.attention"] == ("auto", "xla", "cudnn", "splash")
    assert set(table["model.remat"]) == {"none", "full", "minimal", "dots_saveable", "offload"}
    assert table["lora.targets"] == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    expected = {"data.packer", "data.train_on", "model.attention", "model.remat", "optim.schedule"}
    expected |= {"train.loss_reduction", "model.dtype", "model.param_dtype", "lora.targets"}
    assert expected <= set(table)


@pytest.mark.parametrize("key", sorted(config.choices()))
def test_bad_choice_is_one_line_naming_key_value_and_choices(key):
    value = "q_proj,nope" if key in config.LIST_VALUED_KEYS else "nope"
    with pytest.raises(config.ConfigError) as err:
        _load(f"--config={TINY}", f"--config.{key}={value}")
    allowed = ", ".join(config.choices()[key])
    assert str(err.value) == f"{key}: 'nope' is not one of {allowed} ({TINY})"


def test_every_declared_choice_is_accepted_and_implemented():
    cfg = _load(f"--config={TINY}")
    for key, allowed in config.choices().items():
        group, name = key.split(".")
        default = cfg[group][name]
        for choice in allowed:
            cfg[group][name] = choice
            config.validate(cfg)
        cfg[group][name] = default
    for schedule in config.choices()["optim.schedule"]:
        cfg.optim.schedule = schedule
        warmup_end = round(cfg.optim.warmup_ratio * 100)  # linear warmup, then the schedule from lr
        assert float(optim.make_schedule(cfg.optim, 100)(warmup_end)) == pytest.approx(cfg.optim.lr)
    for dtype in config.choices()["model.param_dtype"]:
        assert models.dtype_of(dtype).dtype.name == dtype


def test_lora_targets_are_a_comma_separated_list_of_known_kernels():
    cfg = _load(f"--config={TINY}", "--config.lora.targets= q_proj , v_proj")
    assert cfg.lora.targets == " q_proj , v_proj"
    with pytest.raises(config.ConfigError, match="lora.targets is empty: name one or more of q_proj, k_proj"):
        _load(f"--config={TINY}", "--config.lora.targets= , ")


def test_model_revision_is_a_string(tmp_path):
    cfg = _load(f"--config={TINY}", "--config.model.revision=0123456789abcdef0123456789abcdef01234567")
    assert cfg.model.revision == "0123456789abcdef0123456789abcdef01234567"
    file = tmp_path / "none_revision.py"
    file.write_text(
        "from jsft.config import default_config\n"
        "def get_config():\n    c = default_config()\n    c.model.path = 'org/name'\n"
        "    c.data.mixer = (('rows.jsonl', 1.0),)\n    c.model.revision = None\n    return c\n"
    )
    with pytest.raises(config.ConfigError) as err:
        _load(f"--config={file}")
    assert str(err.value) == f"model.revision must be a string (branch, tag or commit), got None ({file})"


def test_mesh_that_does_not_fit_the_devices_is_a_config_error():
    assert len(jax.devices()) == 8
    with pytest.raises(config.ConfigError) as err:
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    assert (
        str(err.value)
        == "mesh data=3 x fsdp=1 x expert=1 x context=1 x tensor=1 needs 3 devices, but there are 8"
    )
    with pytest.raises(
        config.ConfigError,
        match="^mesh data=-1 x fsdp=3 x expert=1 x context=1 x tensor=1 does not fit 8 devices$",
    ):
        sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})


@pytest.mark.parametrize(
    "override, last_line",
    [
        (
            "--config.data.packer=firstfit",
            f"jsft: config error: data.packer: 'firstfit' is not one of first_fit, best_fit ({TINY})",
        ),
        (
            "--config.mesh.data=3",
            "jsft: error: mesh data=3 x fsdp=1 x expert=1 x context=1 x tensor=1 needs 3 devices, but there "
            "are 8",
        ),
    ],
)
def test_cli_stops_on_bad_choices_and_meshes_before_loading_anything(tmp_path, override, last_line):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jsft.train",
            f"--config={TINY}",
            f"--config.output_dir={tmp_path}/run",
            override,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == last_line
    assert "Traceback" not in out.stderr
    assert "encoding" not in out.stderr and "mixer" not in out.stderr  # no data was read


def test_a_key_added_after_a_checkpoint_counts_as_its_default():
    saved = json.loads(config.default_config().to_json())
    del saved["model"]["revision"]  # a checkpoint written before the key existed
    current = config.default_config()
    assert config.breaking_changes(saved, current) == []
    current.model.revision = "v2"
    assert config.breaking_changes(saved, current) == ["model.revision"]


def test_per_tensor_remat_is_parsed_and_bad_names_are_one_line():
    assert config.parse_custom_remat("full") is None
    assert config.parse_custom_remat("custom:save=q_proj, k_proj;offload=layer_input") == (
        ("q_proj", "k_proj"),
        ("layer_input",),
    )
    cfg = config.default_config()
    cfg.model.path, cfg.data.mixer = "m", (("d.jsonl", 1.0),)
    cfg.model.remat = "custom:save=o_proj;offload=layer_input"
    config.validate(cfg)
    for value, message in (
        ("custom:save=qq_proj", "'qq_proj' is not one of layer_input, q_proj"),
        ("custom:keep=q_proj", "'keep' is not save or offload"),
        ("custom:save=q_proj;offload=q_proj", "'q_proj' is both saved and offloaded"),
    ):
        cfg.model.remat = value
        with pytest.raises(errors.ConfigError, match=re.escape(message)):
            config.validate(cfg)
