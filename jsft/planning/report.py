"""The plan `python -m jsft.cli.plan` prints: parameters, mesh, sharding, memory per device against the
device's, steps and wall time at a stated MFU, and when the step does not fit, the search's pick,
compiled again from the printed overrides.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax

from jsft import config, flops, hardware, step
from jsft.data.batching import Batching
from jsft.errors import JsftError
from jsft.models import shapes
from jsft.planning.compiled import Memory, build_trainer, compile_step, topology_devices
from jsft.planning.search import search
from jsft.planning.steps import DataPlan, data_plan, step_rows
from jsft.units import GIB


def parameter_counts(trainer) -> tuple[int, int]:
    """(the model's parameters, those the optimizer trains: all, or LoRA's factors and `also_train`)."""
    total = sum(math.prod(s.shape) for n, s in trainer.layout.shapes.items() if ".lora_" not in n)
    trained = step.trainable_shapes(trainer.layout, trainer.lora)
    return total, sum(math.prod(s.shape) for s in trained.values())


def sharding_table(trainer) -> list[str]:
    """One line per trained parameter: shape, how it is split over the mesh, bytes per device."""
    params, shardings = trainer.abstract_state().params, trainer.shardings.params
    lines = []
    for name, shape in params.items():
        spec = shardings[name].spec
        per_device = math.prod(shardings[name].shard_shape(shape.shape)) * shape.dtype.itemsize
        lines.append(
            f"  {name:<34} {str(tuple(shape.shape)):<22} {str(tuple(spec)):<34} {per_device / 2**20:9.1f} MiB"
        )
    return lines


def step_seconds(trainer, rows: int, devices: int, peak_flops: float, mfu: float) -> float:
    """One step's time at `mfu`: the model FLOPs of `rows` rows (every position computed) over the
    devices' peak."""
    seq = trainer.cfg.data.max_seq_length
    tokens = rows * seq
    return flops.mfu_flops_per_token(trainer.layout.cfg, seq) * tokens / (devices * peak_flops * mfu)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def plan_devices(args: argparse.Namespace) -> tuple[list, float, str]:
    """(the devices to compile for, memory per device, a line saying what the figures mean)."""
    if args.topology:
        devices = topology_devices(args.topology)
        topology = hardware.topology(args.topology)
        memory = args.device_memory or topology.chip.hbm_bytes
        return (
            devices,
            memory,
            (
                f"{len(devices)} x {devices[0].device_kind} ({args.topology}, {topology.topology_name}), "
                f"{memory / GIB:.1f} GiB each: memory from the TPU compiler"
            ),
        )
    devices = jax.devices()
    memory = args.device_memory or 80 * GIB
    return (
        devices,
        memory,
        (
            f"{len(devices)} simulated CPU devices, {memory / GIB:.1f} GiB each"
            f"{'' if args.device_memory else ' (default; set --device_memory)'}: XLA:CPU compiles the step, "
            "an estimate for GPUs (bf16 matmul outputs kept in float32: temporaries are an upper bound)"
        ),
    )


def describe(trainer, memory: Memory, budget: float) -> list[str]:
    """The model, mesh, sharding and memory lines of a compiled setting."""
    total, trained = parameter_counts(trainer)
    cfg, model = trainer.cfg, trainer.layout.cfg
    verdict = "fits" if memory.peak <= budget else "DOES NOT FIT"
    return [
        f"parameters  {_count(total)} total, {_count(trained)} trained"
        f"{f' (LoRA rank {cfg.lora.rank})' if trainer.lora else ''}; stored {cfg.model.param_dtype}, "
        f"compute {model.dtype.__name__}, remat {model.remat}, attention {trainer.layout.attention}",
        "mesh        " + " x ".join(f"{axis}={size}" for axis, size in trainer.mesh.shape.items()),
        "sharding    (trained parameters; optimizer moments are split like their parameter)",
        *sharding_table(trainer),
        f"memory      per device: state {memory.state / GIB:.2f} GiB, batch {memory.batch / GIB:.3f} GiB, "
        f"temporaries {memory.temporaries / GIB:.2f} GiB; peak {memory.peak / GIB:.2f} GiB of "
        f"{budget / GIB:.1f} GiB: {verdict} ({memory.peak / budget:.0%})",
        *([f"            the TPU compiler refused it: {memory.refused}"] if memory.refused else []),
        *([f"            offloaded to host memory: {memory.host / GIB:.2f} GiB"] if memory.host else []),
    ]


def schedule_lines(trainer, steps: DataPlan, devices: list, args: argparse.Namespace) -> list[str]:
    cfg = trainer.cfg
    seq = cfg.data.max_seq_length
    rows, how = step_rows(trainer, steps)
    peak = (
        cfg.log.peak_flops
        or hardware.peak_flops(devices[0].device_kind)
        or hardware.peak_flops(hardware.DEFAULT_GPU)
    )
    named = (
        devices[0].device_kind
        if devices[0].platform == "tpu"
        else "an H100 SXM (set log.peak_flops for another)"
    )
    seconds = step_seconds(trainer, rows, len(devices), peak, args.mfu)
    batch = Batching.from_config(cfg, trainer.mesh).describe(rows)
    lines = [
        f"batch       {batch} x {seq} tokens = {rows * seq} token slots per step, "
        f"{cfg.train.grad_accum_steps} micro-batch(es)" + (f"; rows: {how}" if how else ""),
        f"steps       {steps.steps_per_epoch or '?'} per epoch, {steps.total_steps or '?'} in total: "
        + steps.note,
        f"time        {seconds:.2f} s per step at MFU {args.mfu:g} of {peak / 1e12:.0f} TFLOP/s per device "
        f"({named})",
    ]
    if steps.total_steps:
        lines.append(f"            {_duration(seconds * steps.total_steps)} for {steps.total_steps} steps")
    return lines


def run(cfg, config_argv: list[str], args: argparse.Namespace, log=print) -> dict:
    """Prints the plan; returns its figures (the setting's Memory, the pick, its verified Memory and
    every Memory the search compiled)."""
    hf_config, source = shapes.hf_config(cfg.model.path, cfg.model.revision)
    devices, budget, what = plan_devices(args)
    log(f"model       {cfg.model.path}: config.json from {source}")
    log(f"devices     {what}")
    steps = data_plan(cfg, args.examples, args.mean_tokens)
    result = {"memory": None, "pick": None, "pick_memory": None, "searched": {}}
    try:
        trainer = build_trainer(cfg, hf_config, devices)
    except JsftError as e:  # the mesh or the batch split does not suit these devices: the search may
        if args.no_search:
            raise
        log(f"as given    {e}: searching for a setting that does")
    else:
        _, result["memory"], _ = compile_step(trainer, step_rows(trainer, steps)[0])
        for line in describe(trainer, result["memory"], budget) + schedule_lines(
            trainer, steps, devices, args
        ):
            log(line)
        if result["memory"].peak <= budget or args.no_search:
            return result
    log("search      remat x accumulation x fsdp/expert/context/tensor, cheapest first:")
    pick, result["searched"] = search(cfg, hf_config, devices, budget, steps, log=log)
    if pick is None:
        log(f"search      nothing fits {budget / GIB:.1f} GiB per device: use more devices, or LoRA")
        return result
    overrides = pick.overrides()
    log(f"pick        {' '.join(overrides)}")
    verified = config.load([sys.argv[0], *config_argv, *overrides])  # the printed overrides themselves
    checked = build_trainer(verified, hf_config, devices)
    if verified.to_dict() == pick.apply(cfg).to_dict():  # the config the search compiled: no second compile
        pick_memory, how = result["searched"][pick], "give the config the search compiled"
    else:
        _, pick_memory, _ = compile_step(checked, step_rows(checked, steps)[0])
        how = "compiled"
    log(
        f"verified    these overrides {how}: peak {pick_memory.peak / GIB:.2f} GiB of {budget / GIB:.1f} GiB "
        f"({'fits' if pick_memory.peak <= budget else 'DOES NOT FIT'})"
    )
    batch, _, *time = schedule_lines(checked, steps, devices, args)
    for line in (batch, *time):
        log(line)
    return result | {"pick": pick, "pick_memory": pick_memory, "verified": verified}
