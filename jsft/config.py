"""The run configuration: one schema, loaded from a Python config file plus command-line overrides.

Config files define `get_config()` and start from `default_config()`, so every tool speaks the same
names. The schema is locked: a misspelled key is an error that names it, raised before any work.

Over 450 lines on purpose: every key, its allowed values or range, and the grammar of a mixer entry are
declared here together, read as one table, so that no module below it has to be imported to check a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from jsft.errors import ConfigError, DataError, one_line

# The values of every choice key, declared with the schema; the modules that implement a choice import its
# names from here, so the config loads without JAX and a name exists in one place.
DTYPES = ("float32", "bfloat16")  # model.param_dtype; model.dtype also takes "auto"
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
REMAT_CHOICES = ("none", "full", "dots_saveable", "minimal", "offload")  # what each block keeps for backward
# Per-tensor remat, `model.remat="custom:save=q_proj,k_proj;offload=layer_input"`: the named activations of
# each block saved in device memory or offloaded to host memory; every other one is recomputed.
REMAT_NAMES = (
    "layer_input",
    "q_proj",
    "k_proj",
    "v_proj",
    "attention_out",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
CUSTOM_REMAT = "custom:"


def parse_custom_remat(value: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(saved names, offloaded names) of a `custom:` remat value, None for a named policy; a bad one is a
    ConfigError naming the part."""
    if not isinstance(value, str) or not value.startswith(CUSTOM_REMAT):
        return None
    lists = {"save": (), "offload": ()}
    for part in filter(None, (p.strip() for p in value[len(CUSTOM_REMAT) :].split(";"))):
        kind, _, names = part.partition("=")
        kind = kind.strip()
        if kind not in lists:
            raise ConfigError(f"model.remat={value!r}: {kind!r} is not save or offload")
        lists[kind] = tuple(n.strip() for n in names.split(",") if n.strip())
        unknown = [n for n in lists[kind] if n not in REMAT_NAMES]
        if unknown:
            raise ConfigError(f"model.remat={value!r}: {unknown[0]!r} is not one of {', '.join(REMAT_NAMES)}")
    both = set(lists["save"]) & set(lists["offload"])
    if both:
        raise ConfigError(f"model.remat={value!r}: {sorted(both)[0]!r} is both saved and offloaded")
    return lists["save"], lists["offload"]


PACKERS = ("first_fit", "best_fit")  # Grain's packers
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")
ON_UNLOCATED_TURN = ("drop_row", "train_located")
LOSS_REDUCTIONS = ("mean", "sum")
BATCH_UNITS = ("rows", "examples")  # what train.global_batch_size counts
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor")
# "param": the parameters' storage dtype (param_dtype); "bfloat16": first moment rounded to nearest,
# second moment rounded stochastically (its small per-step changes would otherwise round away)
MOMENT_DTYPES = ("param", "float32", "bfloat16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_BASE_DTYPES = ("auto", "float32", "bfloat16")  # auto: the compute dtype (model.dtype)
QUANTIZATIONS = ("none", "int8", "nf4")
EVAL_KINDS = ("generate", "choice")  # a scored task: generated text, or the likeliest of its choices
EVAL_SCORES = ("exact_match", "contains", "final_answer")  # how a generated answer is compared


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key takes: between `low` and `high` (each end included unless `open`), never
    one of `excluded`. NaN is in no range."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    excluded: tuple[float, ...] = ()

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and value not in self.excluded

    def __str__(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            opening, closing = "(["[not self.low_open], ")]"[not self.high_open]
            text = f"in {opening}{self.low:g}, {self.high:g}{closing}"
        return text + "".join(f" and not {x:g}" for x in self.excluded)


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
FRACTION, BELOW_1 = Range(0, 1), Range(0, 1, high_open=True)
MESH_AXIS = Range(-1, excluded=(0,))  # -1 fills the rest of the devices
# Every numeric key's range, checked by `validate` before anything runs.
RANGES: dict[str, Range] = {
    "data.max_seq_length": Range(2),
    "data.max_bad_fraction": FRACTION,
    "data.num_proc": AT_LEAST_0,
    "data.max_row_chars": AT_LEAST_1,
    "train.global_batch_size": AT_LEAST_1,
    "train.grad_accum_steps": AT_LEAST_1,
    "train.epochs": AT_LEAST_0,
    "train.max_steps": AT_LEAST_0,
    "train.seed": Range(0, 2**31 - 1),
    "train.z_loss": AT_LEAST_0,
    "train.router_aux_loss_coef": Range(-1),  # below 0: config.json's
    "train.router_z_loss": AT_LEAST_0,
    "train.max_nonfinite_steps": AT_LEAST_1,
    "optim.lr": POSITIVE,
    "optim.warmup_ratio": BELOW_1,
    "optim.warmup_steps": Range(-1),  # -1: use warmup_ratio
    "optim.weight_decay": AT_LEAST_0,
    "optim.b1": BELOW_1,
    "optim.b2": BELOW_1,
    "optim.eps": POSITIVE,
    "optim.clip_grad_norm": AT_LEAST_0,
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.expert": MESH_AXIS,
    "mesh.context": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "mesh.num_processes": AT_LEAST_1,
    "mesh.process_id": AT_LEAST_0,
    "checkpoint.every_steps": AT_LEAST_1,
    "checkpoint.every_minutes": AT_LEAST_0,
    "checkpoint.keep": AT_LEAST_1,
    "checkpoint.step": Range(-1),  # -1: the latest
    "lora.rank": AT_LEAST_0,
    "lora.alpha": POSITIVE,
    "lora.dropout": BELOW_1,
    "lora.quant_block": AT_LEAST_1,
    "log.every_steps": AT_LEAST_1,
    "log.eval_every_steps": AT_LEAST_0,
    "log.peak_flops": AT_LEAST_0,
    "log.sample_every_steps": AT_LEAST_0,
    "log.sample_max_new_tokens": AT_LEAST_1,
}
MAX_ROW_CHARS = 2_000_000  # data.max_row_chars' default (~500k tokens of text)
# Row formats a mixer entry may name: format -> (required fields, optional fields); a field's column is the
# field's name unless the entry maps it. Detection tries them in this order.
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prompt_messages": (("prompt", "messages"), ("tools",)),
    "messages": (("messages",), ("tools",)),
    "prompt_completion": (("prompt", "completion"), ("tools",)),
    "sharegpt": (("conversations",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
}

# The grammar of a scored evaluation task (`log.eval_tasks`, `jsft-eval --tasks`): key -> (the kinds it
# applies to, its type, its default; a default of None marks a required key). Rows are JSON lines: a
# "generate" row has "prompt" (text) or "messages" (a conversation; a last assistant turn is the answer)
# and "answer" (text); a "choice" row has "prompt" (text), "choices" (2+ texts) and "answer" (an index).
EVAL_TASK_KEYS: dict[str, tuple[tuple[str, ...], type | tuple[type, ...], object]] = {
    "name": (EVAL_KINDS, str, None),  # the name scores are reported under
    "path": (EVAL_KINDS, str, None),  # a local .jsonl file
    "kind": (EVAL_KINDS, str, None),  # one of EVAL_KINDS
    "limit": (EVAL_KINDS, int, 0),  # only the first N rows (0 = all)
    "score": (("generate",), str, "exact_match"),  # one of EVAL_SCORES
    "answer_regex": (("generate",), str, ""),  # final_answer: its first group (else the match) is the answer
    "ignore_case": (("generate",), bool, False),
    "max_new_tokens": (("generate",), int, 32),
    "chat": (("generate",), bool, True),  # render the prompt with the chat template (else the raw text)
    "stop": (("generate",), (tuple, list), ()),  # texts that end an answer (besides the EOS token)
    "delimiter": (
        ("choice",),
        str,
        " ",
    ),  # put between the prompt and each choice (lm-eval's target_delimiter)
}


def eval_task(entry: object, where: str = "log.eval_tasks") -> dict:
    """A scored task's entry checked against `EVAL_TASK_KEYS` and completed with the defaults."""
    if not isinstance(entry, dict) and not hasattr(entry, "to_dict"):
        raise ConfigError(f"{where}: a task is a dict of {', '.join(EVAL_TASK_KEYS)}, got {entry!r}")
    entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    kind = entry.get("kind")
    if kind not in EVAL_KINDS:
        raise ConfigError(
            f"{where}: task {entry.get('name', '?')!r}: kind must be one of {', '.join(EVAL_KINDS)}"
        )
    task = {}
    for key, (kinds, types, default) in EVAL_TASK_KEYS.items():
        if kind in kinds:
            value = entry.pop(key, default)
            if value is None:
                raise ConfigError(f"{where}: task {entry.get('name', '?')!r} lacks the key {key!r}")
            if not isinstance(value, types) or (types is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{where}: task {task.get('name', '?')!r}: {key}={value!r} has the wrong type"
                )
            task[key] = value
    if entry:
        known = [k for k, (kinds, _, _) in EVAL_TASK_KEYS.items() if kind in kinds]
        raise ConfigError(
            f"{where}: task {task['name']!r}: unknown key {sorted(entry)[0]!r} for kind {kind} "
            f"(keys: {', '.join(known)})"
        )
    checks = [
        (task["name"] != "" and "/" not in task["name"], "name must be non-empty, without '/'"),
        (task["path"].endswith(".jsonl"), f"path {task['path']!r} is not a .jsonl file"),
        (task["limit"] >= 0, f"limit={task['limit']} must be >= 0"),
        (task.get("score", EVAL_SCORES[0]) in EVAL_SCORES, f"score must be one of {', '.join(EVAL_SCORES)}"),
        (task.get("max_new_tokens", 1) >= 1, "max_new_tokens must be at least 1"),
        (all(isinstance(s, str) and s for s in task.get("stop", ())), "stop must be non-empty texts"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: task {task['name']!r}: {message}")
    if task.get("answer_regex"):
        try:
            re.compile(task["answer_regex"])
        except re.error as e:
            raise ConfigError(f"{where}: task {task['name']!r}: answer_regex: {e}") from None
    return task


def default_config() -> ml_collections.ConfigDict:
    """Every key jsft knows, with its default value.

    Long on purpose: this is the schema, one line per key with its comment, read as a table.
    """
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/default"
    c.model = ml_collections.ConfigDict(
        {
            "path": "",  # a Hugging Face model folder (config.json, *.safetensors, tokenizer files) or Hub id
            "revision": "",  # with a Hub id: a branch, tag or commit ("" = the default branch)
            "dtype": "auto",  # compute dtype of activations: auto = bfloat16 on GPU/TPU, float32 on CPU
            "param_dtype": "float32",  # storage dtype of parameters and optimizer moments
            "attention": "auto",  # auto | xla | cudnn | splash (auto: cudnn on NVIDIA, splash on TPU)
            # none | full | minimal | dots_saveable | offload | custom:save=NAMES;offload=NAMES (REMAT_NAMES):
            # what each block keeps for the backward pass
            "remat": "none",
            "scan_layers": True,  # one lax.scan over stacked layers: compile time does not grow with depth
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            # (source, amount) or (source, amount, format) entries: a local .jsonl/.json/.parquet file or
            # folder, or a Hub data set name. An amount with a decimal point is a fraction of the source,
            # an integer is a row count. The format (detected when absent) is a name or a dict naming the
            # columns, e.g. {"format": "prompt_completion", "prompt": "question"} (see jsft/data/sources.py).
            "mixer": (),
            "eval_mixer": (),  # held-out data, evaluated every log.eval_every_steps and at the end
            "chat_template": "",  # "" = the tokenizer's own; "tulu", "chatml", or a path to a Jinja file
            "max_seq_length": 2048,
            "packing": True,
            "max_bad_fraction": 0.01,  # more bad rows than this fraction stops the run
            "train_on": "all_assistant_turns",  # or "last_assistant_turn"
            # an assistant turn not found in the full render: drop_row (default) or train_located (the row
            # trains its other turns); counted either way
            "on_unlocated_turn": "drop_row",
            "packer": "first_fit",  # or "best_fit" (Grain's packers)
            "cache_dir": "",  # encoded data cache; "" = $JSFT_CACHE or ~/.cache/jsft/data
            "num_proc": 0,  # encoding processes; 0 = one per CPU core
            # a row longer than this (in characters, before rendering) is dropped and counted: no real
            # conversation comes near it, and one huge row would otherwise hold up encoding for minutes
            "max_row_chars": MAX_ROW_CHARS,
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "global_batch_size": 8,  # per optimizer step, over all hosts: packed rows, or examples (below)
            # "rows": a step is global_batch_size packed rows of max_seq_length tokens; "examples": a
            # step is exactly global_batch_size conversations, packed into as few rows as they need
            "batch_unit": "rows",
            "grad_accum_steps": 1,
            "epochs": 1,
            "max_steps": 0,  # above 0, overrides epochs
            "seed": 0,
            "loss_reduction": "mean",  # "mean" over trained tokens of the global batch, or "sum"
            "z_loss": 0.0,  # weight of log(Z)^2 per trained token (0 = off)
            # A mixture of experts' router losses, per trained token: the load-balancing loss's weight
            # (-1 = config.json's router_aux_loss_coef) and the router z-loss's (0 = off)
            "router_aux_loss_coef": -1.0,
            "router_z_loss": 0.0,
            "max_nonfinite_steps": 5,  # consecutive skipped non-finite steps before the run stops
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "name": "adamw",  # adamw | adafactor (factored second moment, no first moment: lean state)
            "moment_dtype": "param",  # AdamW's moments: param (param_dtype) | float32 | bfloat16
            "lr": 1e-5,
            "schedule": "linear",  # linear | cosine | constant, each after a linear warmup
            "warmup_ratio": 0.03,
            "warmup_steps": -1,  # >= 0 overrides warmup_ratio
            "weight_decay": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "clip_grad_norm": 1.0,  # 0 turns clipping off
        }
    )
    c.mesh = ml_collections.ConfigDict(
        {
            "data": -1,  # -1 fills the rest
            "fsdp": 1,
            # Splits a mixture of experts' experts over this many devices (tokens travel to them and
            # back); outside the experts these devices split the batch's rows like fsdp.
            "expert": 1,
            # Splits each row's tokens over this many devices (long rows); rows must divide into
            # 2 x context chunks (zigzag load balance, see jsft.sharding.context_order).
            "context": 1,
            "tensor": 1,
            # Multi-process launches: TPU pods and SLURM are detected; elsewhere name the coordinator.
            "coordinator_address": "",  # host:port of process 0
            "num_processes": 1,
            "process_id": 0,
        }
    )
    c.checkpoint = ml_collections.ConfigDict(
        {
            "every_steps": 500,
            "every_minutes": 0.0,  # also save when this much time passed since the last save (0 = off)
            "keep": 3,
            "resume": True,  # continue from the latest complete checkpoint in output_dir
            "step": -1,  # resume from this step instead of the latest
            "overwrite": False,  # with resume=False, start over even if checkpoints exist
            "force_resume": False,  # resume even if the config changed in ways that break the run
        }
    )
    c.lora = ml_collections.ConfigDict(
        {
            "rank": 0,  # 0 = full fine-tuning
            "alpha": 16.0,  # the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora)
            "targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            # a regex full-matched against HF module names (model.layers.0.self_attn.q_proj), as PEFT's
            # target_modules; overrides targets when set
            "target_regex": "",
            "use_rslora": False,  # rsLoRA: scale by alpha / sqrt(rank)
            "dropout": 0.0,  # dropout on the factors' input during training
            "also_train": "",  # comma-separated regexes of parameters trained fully, e.g. "embed,.*norm.*"
            "base_dtype": "auto",  # storage of the frozen base: auto = model.dtype (the compute dtype)
            "base_quantization": "none",  # none | int8 | nf4 (QLoRA): the frozen kernels, block-wise
            "quant_block": 64,  # values per quantization scale (the largest divisor of the axis up to this)
            "init_from": "",  # a PEFT adapter folder to start from (same rank, alpha, targets)
            "init_from_any_base": False,  # continue an init_from adapter trained on another base model
        }
    )
    c.log = ml_collections.ConfigDict(
        {
            "every_steps": 10,
            "eval_every_steps": 0,
            "peak_flops": 0.0,  # per-device peak FLOP/s for MFU; 0 = look up the device kind
            "sample_every_steps": 0,  # greedy completions of a few prompts every this many steps (0 = off)
            "sample_prompts": (),  # user messages to complete; () = the first held-out conversations
            "sample_max_new_tokens": 64,
            # scored tasks (dicts, grammar: EVAL_TASK_KEYS) run with the held-out loss: at the start,
            # every eval_every_steps and at the end
            "eval_tasks": (),
            "wandb_project": "",  # also log to this Weights & Biases project ("" = off; TensorBoard always)
        }
    )
    return c


# Keys that may change between a checkpoint and its resumption without changing the run's result.
RESUME_SAFE_KEYS = ("output_dir", "log.", "checkpoint.", "mesh.", "train.max_nonfinite_steps")


def breaking_changes(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run's, except resume-safe ones.

    A key the checkpoint predates counts as its default, which is what that run had in effect.
    """
    old = _paths(default_config()) | _paths(ml_collections.ConfigDict(saved))
    new = _paths(current)
    changed = [k for k in sorted(set(old) | set(new)) if _normalise(old.get(k)) != _normalise(new.get(k))]
    return [k for k in changed if not k.startswith(RESUME_SAFE_KEYS)]


def _normalise(value):
    """Tuples and lists compare equal (JSON turns tuples into lists)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_paths(value, name + "."))
        else:
            out[name] = value
    return out


def _unknown_key_error(name: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{name}' in {where}{hint}")


# Keys whose value is a comma-separated list of choices rather than one.
LIST_VALUED_KEYS = ("lora.targets",)


def choices() -> dict[str, tuple[str, ...]]:
    """Every choice-valued key and the values it takes: the one table `validate` checks."""
    return {
        "model.dtype": ("auto", *DTYPES),
        "model.param_dtype": DTYPES,
        "model.attention": ATTENTION_IMPLEMENTATIONS,
        "model.remat": REMAT_CHOICES,
        "data.packer": PACKERS,
        "data.train_on": TRAIN_ON,
        "data.on_unlocated_turn": ON_UNLOCATED_TURN,
        "train.loss_reduction": LOSS_REDUCTIONS,
        "train.batch_unit": BATCH_UNITS,
        "optim.schedule": SCHEDULES,
        "optim.name": OPTIMIZERS,
        "optim.moment_dtype": MOMENT_DTYPES,
        "lora.targets": LORA_TARGETS,
        "lora.base_dtype": LORA_BASE_DTYPES,
        "lora.base_quantization": QUANTIZATIONS,
    }


def _check_choices(cfg: ml_collections.ConfigDict, where: str) -> None:
    given = _paths(cfg)
    for key, allowed in choices().items():
        value = given[key]
        if key in LIST_VALUED_KEYS:
            names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else [value]
            if not names:
                raise ConfigError(f"{key} is empty: name one or more of {', '.join(allowed)} ({where})")
        else:
            names = [value]
        for name in names:
            if key == "model.remat" and parse_custom_remat(name) is not None:
                continue  # a per-tensor policy, checked by its parser
            if name not in allowed:
                raise ConfigError(f"{key}: {name!r} is not one of {', '.join(allowed)} ({where})")


def _check_ranges(given: dict[str, object], where: str) -> None:
    for key, allowed in RANGES.items():
        value = given[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number {allowed}, got {value!r} ({where})")
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed} ({where})")


def validate(cfg: ml_collections.ConfigDict, where: str = "config") -> None:
    """Checks that `cfg` has exactly the schema's keys and sensible values."""
    known = _paths(default_config())
    given = _paths(cfg)
    for name in given:
        if name not in known:
            raise _unknown_key_error(name, list(known), where)
    for name in known:
        if name not in given:
            raise ConfigError(f"config key '{name}' is missing in {where}")
    _check_choices(cfg, where)
    _check_ranges(given, where)
    checks = [
        (cfg.model.path != "", "model.path is empty: set it to a Hugging Face model folder or Hub id"),
        (
            isinstance(cfg.model.revision, str),
            f"model.revision must be a string (branch, tag or commit), got {cfg.model.revision!r}",
        ),
        (len(cfg.data.mixer) > 0, "data.mixer is empty: give at least one (source, amount) pair"),
        (
            cfg.train.global_batch_size % cfg.train.grad_accum_steps == 0,
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}",
        ),
        (cfg.train.epochs > 0 or cfg.train.max_steps > 0, "set train.epochs or train.max_steps above 0"),
        (
            cfg.mesh.context <= 1 or cfg.data.max_seq_length % (2 * cfg.mesh.context) == 0,
            f"data.max_seq_length={cfg.data.max_seq_length} must divide into 2 x mesh.context = "
            f"{2 * cfg.mesh.context} equal chunks (each device holds an early and a late one)",
        ),
        (
            cfg.optim.name == "adamw" or cfg.optim.moment_dtype == "param",
            f"optim.moment_dtype={cfg.optim.moment_dtype!r} is AdamW's; optim.name={cfg.optim.name!r} "
            "keeps its own factored float32 statistics",
        ),
        (
            all(isinstance(p, str) and p for p in cfg.log.sample_prompts),
            "log.sample_prompts must be non-empty strings (user messages)",
        ),
        (
            not cfg.log.sample_every_steps or bool(cfg.log.sample_prompts or cfg.data.eval_mixer),
            "log.sample_every_steps needs log.sample_prompts or data.eval_mixer to take prompts from",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{message} ({where})")
    for entry in list(cfg.data.mixer) + list(cfg.data.eval_mixer):
        try:
            mixer_entry(entry)
        except DataError as e:
            raise ConfigError(f"data.mixer: {e} ({where})") from None
    names = [eval_task(entry, f"log.eval_tasks ({where})")["name"] for entry in cfg.log.eval_tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"log.eval_tasks: two tasks are named {max(names, key=names.count)!r} ({where})")


def parse_format(spec: object, where: str) -> tuple[str | None, dict[str, str]]:
    """(format name or None to detect, {field: column}) from a mixer entry's third element."""
    if spec is None or spec == "auto":
        return None, {}
    if isinstance(spec, str):
        spec = {"format": spec}
    if not isinstance(spec, dict):
        raise DataError(f"{where}: the format must be a name or a dict, got {spec!r}")
    mapping = dict(spec)
    name = mapping.pop("format", None)
    if name is not None and name not in FORMATS:
        raise DataError(f"{where}: unknown format {name!r}; formats: {', '.join(FORMATS)}")
    fields = set().union(*(set(r) | set(o) for r, o in ([FORMATS[name]] if name else FORMATS.values())))
    for field, column in mapping.items():
        if field not in fields:
            raise DataError(
                f"{where}: {field!r} is not a field of format {name or 'any'} ({', '.join(sorted(fields))})"
            )
        if not isinstance(column, str):
            raise DataError(f"{where}: the column for {field!r} must be a string, got {column!r}")
    return name, mapping


def mixer_entry(entry: object) -> tuple[str, int | float, object]:
    """(source, amount, format spec or None) from a `(source, amount[, format])` entry."""
    if not (isinstance(entry, (tuple, list)) and len(entry) in (2, 3) and isinstance(entry[0], str)):
        raise DataError(f"mixer entries must be (source, amount) or (source, amount, format), got {entry!r}")
    source, amount, *spec = entry
    spec = spec[0] if spec else None
    parse_format(spec, f"mixer entry for {source}")
    return source, amount, spec


def load(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """Parses `--config=FILE [--config.a.b=value ...]` into a validated, locked ConfigDict.

    Errors (a missing file, an unknown key, an unparsable value) become one-line ConfigErrors.
    """
    argv = list(argv)
    files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    if not files:
        raise ConfigError("no config file given: pass --config=configs/<name>.py")
    if not os.path.isfile(files[-1]):
        raise ConfigError(f"config file {files[-1]} does not exist")
    try:
        # Load the file alone first, so overrides can be checked against its keys.
        base = _parse(argv[:1] + [f"--config={files[-1]}"])
    except Exception as e:  # config_flags reports a missing or broken file in many ways
        raise ConfigError(f"cannot load config file {files[-1]}: {one_line(e)}") from None
    known = list(_paths(base))
    for arg in argv[1:]:
        if arg.startswith("--config."):
            name = arg[len("--config.") :].split("=", 1)[0]
            if name not in known:
                raise _unknown_key_error(name, known, "the command line")
        elif not arg.startswith("--config="):
            raise ConfigError(f"unexpected argument {arg!r}: use --config=FILE and --config.KEY=VALUE")
    try:
        cfg = _parse(argv)
    except Exception as e:
        raise ConfigError(f"bad config override: {one_line(e)}") from None
    validate(cfg, where=files[-1])
    return cfg


def _parse(argv: list[str]) -> ml_collections.ConfigDict:
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return holder.value


def load_or_exit(argv: Sequence[str] | None = None) -> ml_collections.ConfigDict:
    """`load` for entry points: a ConfigError ends the program with its one-line message."""
    try:
        return load(sys.argv if argv is None else argv)
    except ConfigError as e:
        sys.exit(f"jsft: config error: {e}")
