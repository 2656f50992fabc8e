"""Will the run fit, and how long will it take? `python -m jsft.plan --config=FILE [--config.KEY=VALUE ...]`

    --devices=N --device_memory=80GiB   N simulated CPU devices (default: the mesh's size or 8); the
                                        compile is XLA:CPU's, an estimate for GPUs
    --topology=v5p-64                   a TPU slice (needs libtpu): the TPU compiler's own memory
    --mfu=0.4                           the model FLOPs utilisation the wall time assumes
    --examples=N --mean_tokens=T        the data size when the data cache has not been built
    --no_search                         do not look for a setting that fits

Reads only the model's config.json (a local folder, the Hugging Face cache, or jsft's shape table of
known models), never the weights. Prints the parameters (total, trainable), the mesh and each
parameter's sharding, the per-device memory of the compiled train step against the device's memory,
the steps, and the wall time at the stated MFU. When the step does not fit, it searches remat policy x
gradient accumulation x fsdp/tensor split, prints the cheapest setting that fits as config overrides,
and compiles it to check.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys

GIB = 2**30
# Cheapest first: how much of the forward pass each policy recomputes in the backward pass.
REMAT_ORDER = ("none", "dots_saveable", "minimal", "full")
# Relative step time of a setting, for ranking the ones that fit (a model, not a measurement): a
# training step is about 3 forward passes; remat adds the recomputed share of one more (full: all of
# it, minimal: norms, RoPE and attention, dots_saveable: the elementwise work between the matmuls);
# each further micro-batch gathers the parameters again and runs smaller, less efficient matmuls;
# each further tensor split all-reduces every layer's activations.
REMAT_COST = {"none": 1.0, "dots_saveable": 1.05, "minimal": 1.15, "full": 1.33}
MICRO_BATCH_COST, TENSOR_COST = 0.04, 0.08
_HBM_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])")
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> float:
    """'80GiB', '80GB', '95 gib' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmg]i?b?|b?)\s*", text.lower())
    unit = match and (
        match.group(2) if match.group(2).endswith("b") or not match.group(2) else match.group(2) + "b"
    )
    if not match or unit not in _UNITS:
        raise ValueError(f"--device_memory={text!r}: give a size such as 80GiB or 80GB")
    return float(match.group(1)) * _UNITS[unit]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the plan's own flags, the config arguments)."""
    parser = argparse.ArgumentParser(prog="python -m jsft.plan", add_help=False)
    parser.add_argument("--devices", type=int, default=0)
    parser.add_argument("--device_memory", default="")
    parser.add_argument("--topology", default="")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--examples", type=int, default=0)
    parser.add_argument("--mean_tokens", type=float, default=0.0)
    parser.add_argument("--no_search", action="store_true")
    args, rest = parser.parse_known_args(argv)
    problems = [
        (args.topology and args.devices, "give --devices or --topology, not both"),
        (not 0 < args.mfu <= 1, f"--mfu={args.mfu} must be in (0, 1]"),
        (bool(args.examples) != bool(args.mean_tokens), "--examples and --mean_tokens go together"),
        (args.devices < 0 or args.examples < 0 or args.mean_tokens < 0, "sizes must be positive"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"jsft.plan: {message}")
    if args.device_memory:
        try:
            args.device_memory = parse_bytes(args.device_memory)
        except ValueError as e:
            raise SystemExit(f"jsft.plan: {e}") from None
    return args, rest


def prepare_environment(args: argparse.Namespace, mesh_size: int) -> None:
    """Sets up JAX before it initialises: CPU devices to simulate, or the TPU compiler's environment."""
    if args.topology:
        from jsft import tpu

        tpu.prepare_environment()
    else:
        devices = args.devices or mesh_size or 8
        # The memory-minimising scheduler: XLA:CPU's default favours concurrency and inflates temporaries.
        os.environ["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={devices} "
            "--xla_cpu_enable_concurrency_optimized_scheduler=false"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported (not initialised) by the config's validation
        sys.modules["jax"].config.update("jax_platforms", "cpu")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the search varies; the mesh is data=1 x fsdp x tensor."""

    remat: str
    grad_accum_steps: int
    fsdp: int
    tensor: int

    def overrides(self) -> list[str]:
        return [
            f"--config.model.remat={self.remat}",
            f"--config.train.grad_accum_steps={self.grad_accum_steps}",
            "--config.mesh.data=1",
            f"--config.mesh.fsdp={self.fsdp}",
            f"--config.mesh.tensor={self.tensor}",
        ]

    @property
    def cost(self) -> float:
        """Relative step time (see REMAT_COST): the search picks the cheapest setting that fits."""
        return (
            REMAT_COST[self.remat]
            * (1 + MICRO_BATCH_COST * (self.grad_accum_steps - 1))
            * (1 + TENSOR_COST * (self.tensor - 1))
        )

    def apply(self, cfg):
        cfg = cfg.copy_and_resolve_references()
        cfg.model.remat, cfg.train.grad_accum_steps = self.remat, self.grad_accum_steps
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, self.fsdp, self.tensor
        return cfg


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of a compiled train step, from the compiler's memory analysis."""

    state: float
    batch: float
    temporaries: float
    peak: float
    refused: str = ""  # the TPU compiler's out-of-memory message, when it refused to compile

    @classmethod
    def of(cls, compiled, batch_bytes: float) -> Memory:
        m = compiled.memory_analysis()
        live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return cls(
            m.argument_size_in_bytes - batch_bytes,
            batch_bytes,
            m.temp_size_in_bytes,
            live + m.temp_size_in_bytes,
        )

    @classmethod
    def refused_by_compiler(cls, message: str, state_bytes: float, batch_bytes: float) -> Memory:
        """The TPU compiler stops at a program that cannot fit its HBM (CompileTimeHbmOom) and names
        the temporaries it needed; the state is the shards' own size."""
        found = _HBM_OOM.search(message)
        temporaries = (
            float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024 if found else math.inf
        )
        line = next((x for x in message.splitlines() if "Ran out of memory" in x), message.splitlines()[0])
        return cls(
            state_bytes, batch_bytes, temporaries, state_bytes + batch_bytes + temporaries, line.strip()
        )


def build_trainer(cfg, hf_config: dict, devices: list):
    """The run's Trainer over `devices` (simulated CPU or compile-only TPU), from config.json alone."""
    from jsft import models, sharding
    from jsft.trainer import Trainer, check_batch_fits

    platform = devices[0].platform
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16"  # an accelerator's choice
    attention = cfg.model.attention
    if platform == "cpu" and attention in ("auto", "splash", "cudnn"):
        attention = "xla"  # the CPU compile stands in for a GPU's or TPU's program
    model_cfg = models.ModelConfig.from_hf(
        hf_config,
        models.dtype_of(dtype),
        models.dtype_of(cfg.model.param_dtype),
        attention,
        cfg.model.remat,
        cfg.model.scan_layers,
    )
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    layout = models.Layout(model_cfg, device=devices[0])  # splash for a TPU topology, on this CPU host
    check_batch_fits(cfg.train, mesh)
    return Trainer(cfg, layout, mesh, total_steps=1000)


def compile_step(trainer, rows: int | None = None, with_text: bool = False):
    """(compiled train step, its Memory, program text or None) for a global batch of `rows` rows
    (default: `step_rows` without data figures). A TPU program too large for HBM, which the TPU
    compiler refuses, gives (None, Memory with `refused` set, None)."""
    import jax

    from jsft import tpu

    rows = rows or step_rows(trainer)[0]
    seq = trainer.cfg.data.max_seq_length
    shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    batch_bytes = 5 * 4 * rows * seq / shards  # five int32 [rows, seq] arrays split over data x fsdp
    try:
        if with_text:
            lowered = trainer.train_step.lower(trainer.abstract_state(), trainer.abstract_batch(rows, seq))
            compiled, text = tpu.compile_with_text(lowered)
        else:
            compiled, text = trainer.compile_train_step(rows, seq), None
    except jax.errors.JaxRuntimeError as e:
        if "CompileTimeHbmOom" not in str(e):
            raise
        state_bytes = sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(trainer.abstract_state())
        )
        return None, Memory.refused_by_compiler(str(e), state_bytes, batch_bytes), None
    return compiled, Memory.of(compiled, batch_bytes), text


def parameter_counts(trainer) -> tuple[int, int]:
    """(the model's parameters, those the optimizer trains: all, or LoRA's factors and `also_train`)."""
    from jsft import step

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


@dataclasses.dataclass(frozen=True)
class DataPlan:
    steps_per_epoch: int | None  # None: unknown (no data cache, no --examples)
    total_steps: int | None
    note: str  # where the figures come from
    packed_rows: list[int] | None = None  # batch_unit=examples: each batch's rows (data.example_batch_rows)
    mean_tokens: float = 0.0  # --mean_tokens, when only that is known


def data_plan(cfg, examples: int = 0, mean_tokens: float = 0.0) -> DataPlan:
    """Steps per epoch and in total: the packer run over the data cache's lengths when the cache is
    built, else from `examples` x `mean_tokens`, else only `train.max_steps` if set."""
    rows, seq = cfg.train.global_batch_size, cfg.data.max_seq_length
    by_examples = cfg.train.batch_unit == "examples"  # then global_batch_size counts conversations
    cached, why = _cached_examples(cfg)
    if cached is not None:
        from jsft import data

        per_epoch = (
            len(cached) // rows
            if by_examples
            else data.count_batches(
                cached.examples,
                batch_size=rows,
                max_seq_length=seq,
                packing=cfg.data.packing,
                packer=cfg.data.packer,
                seed=cfg.train.seed,
            )
        )
        note = f"from the data cache ({len(cached)} conversations, {cached.tokens} tokens)"
    elif examples:
        slots = rows * seq
        per_epoch = (
            examples // rows
            if by_examples or not cfg.data.packing
            else math.ceil(examples * min(mean_tokens, seq) / slots)
        )
        note = f"estimated from --examples={examples} --mean_tokens={mean_tokens:g}"
        if cfg.data.packing and not by_examples:
            note += " (rows packed full: a lower bound)"
    else:
        per_epoch = None
        note = f"unknown: {why}; run `python -m jsft.prepare` first, or pass --examples=N --mean_tokens=T"
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else (per_epoch and per_epoch * cfg.train.epochs)
    packed_rows = None
    if cached is not None and by_examples:  # once here: the search asks for every mesh's bucket
        from jsft import data

        packed_rows = data.example_batch_rows(
            cached.examples, batch_size=rows, max_seq_length=seq, seed=cfg.train.seed
        )
    return DataPlan(per_epoch, total, note, packed_rows, mean_tokens)


def step_rows(trainer, steps: DataPlan | None = None) -> tuple[int, str]:
    """(the rows of the global batch to compile, how they were found).

    With `train.batch_unit="rows"` that is `global_batch_size`. With "examples" a step's conversations
    are packed into a bucketed number of rows (`data.example_batches`): the largest of one epoch over
    the data cache's lengths; else the mean length's estimate; else the worst case, one row each."""
    from jsft.data.pipeline import row_bucket
    from jsft.trainer import row_multiple

    cfg = trainer.cfg
    batch, seq = cfg.train.global_batch_size, cfg.data.max_seq_length
    if cfg.train.batch_unit == "rows":
        return batch, ""
    multiple = row_multiple(cfg.train, trainer.mesh)
    if steps is not None and steps.packed_rows:
        counts = [row_bucket(n, multiple) for n in steps.packed_rows]
        shapes = ", ".join(f"{r} rows x{counts.count(r)}" for r in sorted(set(counts)))
        return max(counts), f"the largest of one epoch's packed batches ({shapes})"
    if steps is not None and steps.mean_tokens:
        needed = math.ceil(batch * min(steps.mean_tokens, seq) / seq)
        return row_bucket(
            needed, multiple
        ), "packed at the mean length (batches of longer ones take more rows)"
    return row_bucket(batch, multiple), "the worst case, each conversation in a row of its own"


def _cached_examples(cfg):
    """(the encoded training data if its cache is built, else None and why not). Loads the tokenizer
    from a local or cached model folder to find the cache's key; never encodes anything."""
    from jsft.data import preprocess

    local = os.path.isdir(cfg.model.path)
    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(
            cfg.model.path, revision=cfg.model.revision or None, local_files_only=not local
        )
    except (OSError, ValueError):
        return None, f"the tokenizer of {cfg.model.path} is not here to find the data cache"
    try:
        key = preprocess.cache_key(
            cfg.data.mixer,
            tokenizer,
            chat_template=cfg.data.chat_template,
            max_seq_length=cfg.data.max_seq_length,
            train_on=cfg.data.train_on,
            seed=cfg.train.seed,
            on_unlocated_turn=cfg.data.on_unlocated_turn,
        )
    except (OSError, ValueError) as e:
        return None, f"cannot compute the data cache key ({' '.join(str(e).split())[:120]})"
    root = cfg.data.cache_dir or preprocess.default_cache_dir()
    entry = os.path.join(root, key)
    if not os.path.isfile(os.path.join(entry, "stats.json")):
        return None, f"the data cache {entry} is not built"
    return preprocess.load(entry), ""


def step_seconds(trainer, rows: int, devices: int, peak_flops: float, mfu: float) -> float:
    """One step's time at `mfu`: the model FLOPs of `rows` rows (every position computed) over the
    devices' peak."""
    from jsft import flops

    seq = trainer.cfg.data.max_seq_length
    tokens = rows * seq
    return flops.mfu_flops_per_token(trainer.layout.cfg, seq) * tokens / (devices * peak_flops * mfu)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def candidates(cfg, hf_config: dict, devices: int) -> list[Setting]:
    """Every setting the batch and the heads allow, cheapest first: less recomputation (remat), then
    fewer micro-batches (each gathers the parameters again), then less tensor parallelism (each layer
    then all-reduces activations). The mesh is data=1 x fsdp x tensor: all devices shard the state.
    With `batch_unit="examples"` the batch counts conversations and a micro-batch still needs one per
    device: more micro-batches only add rows of padding (rows are a multiple of shards x micro-batches)."""
    rows = cfg.train.global_batch_size
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    tensors = [t for t in (1, 2, 4, 8) if devices % t == 0 and heads % t == 0 and kv_heads % t == 0]
    accums = [a for a in range(1, rows + 1) if rows % a == 0]
    return [
        Setting(remat, accum, devices // tensor, tensor)
        for remat in REMAT_ORDER
        for accum in accums
        for tensor in tensors
        if (rows // accum) % (devices // tensor) == 0
    ]


def search(
    cfg, hf_config: dict, devices: list, budget: float, steps: DataPlan | None = None, log=print
) -> tuple[Setting | None, dict]:
    """The cheapest setting (`Setting.cost`) whose compiled step fits `budget` bytes per device, and every
    compile's Memory.

    Memory falls as accumulation grows (smaller micro-batches), so for each (remat, tensor) group the
    largest accumulation is compiled first: if even that does not fit, the group is skipped; otherwise
    a bisection finds its smallest accumulation that fits. Groups are tried by their best possible
    cost, and the search stops once no remaining group can beat the best fit found.
    """
    measured: dict[Setting, Memory] = {}

    def fits(setting: Setting) -> bool:
        if setting not in measured:
            trainer = build_trainer(setting.apply(cfg), hf_config, devices)
            _, measured[setting], _ = compile_step(trainer, step_rows(trainer, steps)[0])
            memory = measured[setting]
            refused = " (refused by the compiler: out of HBM)" if memory.refused else ""
            log(f"  tried {' '.join(setting.overrides())}: peak {memory.peak / GIB:.2f} GiB{refused}")
        return measured[setting].peak <= budget

    settings = candidates(cfg, hf_config, len(devices))
    groups = {}
    for setting in settings:  # candidates come in increasing accumulation within a group
        groups.setdefault((setting.remat, setting.tensor), []).append(setting)
    best: Setting | None = None
    for group in sorted(groups.values(), key=lambda g: g[0].cost):
        if best is not None and group[0].cost >= best.cost:
            break
        if not fits(group[-1]):
            continue
        low, high = 0, len(group) - 1
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(group[middle]) else (middle + 1, high)
        if best is None or group[high].cost < best.cost:
            best = group[high]
    return best, measured


def plan_devices(args: argparse.Namespace) -> tuple[list, float, str]:
    """(the devices to compile for, memory per device, a line saying what the figures mean)."""
    import jax

    from jsft import tpu

    if args.topology:
        devices = tpu.topology_devices(args.topology)
        memory = args.device_memory or tpu.device_memory(args.topology)
        topology = tpu.TOPOLOGIES[args.topology][0]
        return (
            devices,
            memory,
            (
                f"{len(devices)} x {devices[0].device_kind} ({args.topology}, {topology}), "
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
    ]


def schedule_lines(trainer, steps: DataPlan, devices: list, args: argparse.Namespace) -> list[str]:
    from jsft import flops

    cfg = trainer.cfg
    seq = cfg.data.max_seq_length
    rows, how = step_rows(trainer, steps)
    peak = (
        cfg.log.peak_flops
        or flops.PEAK_FLOPS.get(devices[0].device_kind)
        or flops.PEAK_FLOPS["NVIDIA H100 80GB HBM3"]
    )
    named = (
        devices[0].device_kind
        if devices[0].platform == "tpu"
        else "an H100 SXM (set log.peak_flops for another)"
    )
    seconds = step_seconds(trainer, rows, len(devices), peak, args.mfu)
    conversations = (
        f"{cfg.train.global_batch_size} conversations packed into "
        if cfg.train.batch_unit == "examples"
        else ""
    )
    lines = [
        f"batch       {conversations}{rows} rows x {seq} tokens = {rows * seq} token slots per step, "
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
    from jsft import config
    from jsft.models import shapes

    hf_config, source = shapes.hf_config(cfg.model.path, cfg.model.revision)
    devices, budget, what = plan_devices(args)
    log(f"model       {cfg.model.path}: config.json from {source}")
    log(f"devices     {what}")
    trainer = build_trainer(cfg, hf_config, devices)
    steps = data_plan(cfg, args.examples, args.mean_tokens)
    _, memory, _ = compile_step(trainer, step_rows(trainer, steps)[0])
    for line in describe(trainer, memory, budget) + schedule_lines(trainer, steps, devices, args):
        log(line)
    result = {"memory": memory, "pick": None, "pick_memory": None, "searched": {}}
    if memory.peak <= budget or args.no_search:
        return result
    log("search      remat x accumulation x fsdp/tensor, cheapest first:")
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    args, config_argv = parse_args(argv[1:])
    from jsft import config

    cfg = config.load_or_exit([argv[0], *config_argv])
    mesh_size = math.prod(s for s in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if s > 0)
    prepare_environment(args, mesh_size if -1 not in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) else 0)
    from jsft.errors import JsftError

    try:
        run(cfg, config_argv, args)
    except (JsftError, ValueError) as e:
        sys.exit(f"jsft.plan: {e}")


if __name__ == "__main__":
    main()
