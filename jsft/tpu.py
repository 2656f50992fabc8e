"""TPU programs compiled on a CPU machine: topologies, the compiled program's text, and facts read from it.

With `libtpu` installed (`pip install jsft[tpu]`) and JAX's backend on CPU, `get_topology_desc` gives
device objects of a TPU slice that no one owns; a train step jitted over a mesh of them compiles with
the real TPU compiler (Mosaic kernels included), so its memory analysis is the TPU's own. Call
`prepare_environment()` before JAX initialises.

The program text comes from the compiler's own dump (`xla_dump_to`): `Compiled.as_text()` re-parses
the program and fails on the SparseCore offload instructions large embedding gathers compile to.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import tempfile
from collections.abc import Iterator

GIB = 2**30

# Cloud TPU slice names -> (topology, chip config, memory per JAX device). v5p names count TensorCores
# (2 per chip, one megacore JAX device), v5e/v6e names count chips. Sources: cloud.google.com/tpu/docs
# v5p (95 GiB HBM per chip), v5e (16 GiB), v6e (32 GiB).
TOPOLOGIES: dict[str, tuple[str, str, float]] = {
    "v5p-8": ("v5p:2x2x1", "megacore", 95 * GIB),
    "v5p-16": ("v5p:2x2x2", "megacore", 95 * GIB),
    "v5p-32": ("v5p:2x2x4", "megacore", 95 * GIB),
    "v5p-64": ("v5p:4x4x2", "megacore", 95 * GIB),
    "v5p-128": ("v5p:4x4x4", "megacore", 95 * GIB),
    "v5p-256": ("v5p:4x4x8", "megacore", 95 * GIB),
    "v5e-8": ("v5e:2x4", "default", 16 * GIB),
    "v5e-16": ("v5e:4x4", "default", 16 * GIB),
    "v5e-64": ("v5e:8x8", "default", 16 * GIB),
    "v5e-256": ("v5e:16x16", "default", 16 * GIB),
    "v6e-8": ("v6e:2x4", "default", 32 * GIB),
    "v6e-16": ("v6e:4x4", "default", 32 * GIB),
    "v6e-64": ("v6e:8x8", "default", 32 * GIB),
    "v6e-256": ("v6e:16x16", "default", 32 * GIB),
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Ops that do work on the core while a collective is in flight (anything but bookkeeping).
_BOOKKEEPING = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "copy-start",
    "copy-done",
    "opt-barrier",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) .*\{\s*$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}


class TopologyError(ValueError):
    """An unknown TPU slice name or a missing libtpu, named in one line."""


# libtpu flags jsft sets for every TPU program (training on a TPU and compiling for one here), unless
# LIBTPU_INIT_ARGS names the flag already or JSFT_LIBTPU_DEFAULTS=0. Checked with libtpu 0.0.52 (an
# unknown flag aborts libtpu at start). Collective matmul v2 ("post_spmd"): the partitioner's FSDP
# all-gather -> einsum and einsum -> reduce-scatter become loops of async collective-permutes, each
# overlapped with the einsum on the part already received. Without them only large einsums became
# windowed (the 8B layers on v5p-64); the tiny model's layer all-gathers and gradient all-reduces stayed
# synchronous on v5p-8, and so did a 2048-wide model's (v1 is the default; libtpu's message for it
# says to migrate to v2 with these two flags). The
# latency hiding scheduler's "experimental features" let it place the last permute of a windowed
# gradient reduce-scatter over other work (without them one per layer had nothing between its
# start and done). MaxText's continuation-fusion flags (xla_tpu_enable_async_collective_fusion_*)
# are refused on v5p and v6e by this libtpu ("not supported on platforms other than TPU v5e"), and
# xla_enable_async_all_gather / xla_enable_async_all_reduce change nothing there.
LIBTPU_DEFAULT_FLAGS = (
    "--xla_tpu_all_gather_collective_matmul_mode=post_spmd",
    "--xla_tpu_reduce_scatter_collective_matmul_mode=post_spmd",
    "--xla_tpu_enable_all_experimental_scheduler_features=true",
)


def _flag_name(arg: str) -> str:
    name = arg.lstrip("-").split("=", 1)[0]
    return name[2:] if name.startswith("no") and "=" not in arg else name


def libtpu_init_args(current: str = "") -> str:
    """`current` LIBTPU_INIT_ARGS with each of LIBTPU_DEFAULT_FLAGS it does not set itself appended
    (a flag given there, with any value or as --noNAME, is the user's choice and stays)."""
    given = {_flag_name(a) for a in current.split()}
    added = [f for f in LIBTPU_DEFAULT_FLAGS if _flag_name(f) not in given]
    return " ".join([*current.split(), *added])


LIBTPU_FLAGS_CHECKED_WITH = (0, 0, 52)


def _libtpu_version() -> tuple[int, ...] | None:
    import importlib.metadata

    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(n) for n in numbers.groups()) if numbers else None


def set_libtpu_defaults(environ=os.environ) -> None:
    """Adds LIBTPU_DEFAULT_FLAGS to LIBTPU_INIT_ARGS, keeping what the user set; call before JAX
    initialises its backends (libtpu reads the variable once). Only with a pip-installed libtpu at least
    as new as LIBTPU_FLAGS_CHECKED_WITH (an older one may not know a flag, and aborts on it);
    JSFT_LIBTPU_DEFAULTS=0 turns it off."""
    version = _libtpu_version()
    if (
        environ.get("JSFT_LIBTPU_DEFAULTS", "1") == "0"
        or version is None
        or version < LIBTPU_FLAGS_CHECKED_WITH
    ):
        return
    environ["LIBTPU_INIT_ARGS"] = libtpu_init_args(environ.get("LIBTPU_INIT_ARGS", ""))


def prepare_environment() -> None:
    """Environment for compiling TPU programs on this machine; call before JAX initialises.

    JAX's own backend stays CPU. Several processes may load libtpu at once (other JAX processes of
    the machine hold its lock file otherwise), and no cloud metadata server is asked for a TPU. The
    compiler gets the flags a TPU run of jsft gets (`set_libtpu_defaults`).
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    set_libtpu_defaults()


def device_memory(name: str) -> float:
    return _lookup(name)[2]


def _lookup(name: str) -> tuple[str, str, float]:
    if name not in TOPOLOGIES:
        raise TopologyError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


@functools.cache
def topology_devices(name: str) -> list:
    """The JAX devices of a TPU slice (`v5p-64`, `v6e-64`, ...), compile-only, on a CPU machine."""
    topology, chip_config, _ = _lookup(name)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(f"--topology={name} needs libtpu: pip install 'jsft[tpu]'") from None
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology,
        chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return list(desc.devices)


def compile_with_text(lowered) -> tuple[object, str]:
    """(compiled, scheduled program text after optimisation) of a lowered function."""
    with tempfile.TemporaryDirectory() as folder:
        options = {"xla_dump_to": folder, "xla_dump_hlo_as_text": True}
        compiled = lowered.compile(compiler_options=options)
        dumps = sorted(glob.glob(os.path.join(folder, "*after_optimizations.txt")))
        if not dumps:
            raise RuntimeError(f"the compiler wrote no optimised program into {folder}")
        with open(dumps[-1]) as f:
            return compiled, f.read()


# --- reading the program ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    shape: str
    operands: str
    computation: str
    op_name: str

    @property
    def bytes(self) -> int:
        """Bytes of the result (the first array of a tuple result: an async start's operand alias
        is listed before its destination, so the largest array is taken instead)."""
        sizes = [
            _BYTES.get(dtype, 4 if dtype[-2:] == "32" else 8)
            * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _ARRAY.findall(self.shape)
        ]
        return max(sizes, default=0)


def parse(text: str) -> list[Instruction]:
    """Every instruction of an HLO module's text, in schedule order, with its computation."""
    out, computation = [], ""
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, shape, opcode, rest = match.groups()
            op_name = re.search(r'op_name="([^"]*)"', rest)
            out.append(
                Instruction(name, opcode, shape, rest, computation, op_name.group(1) if op_name else "")
            )
            continue
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
    return out


def _called(instruction: Instruction) -> list[str]:
    """Computations an instruction runs: fusion/call/async bodies, while body and condition, branches."""
    names = re.findall(r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)", instruction.operands)
    branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.operands)
    return names + (re.findall(r"%[\w.\-]+", branches.group(1)) if branches else [])


def _operand_names(instruction: Instruction) -> list[str]:
    return re.findall(r"(%[\w.\-]+)", instruction.operands.split(")", 1)[0])


@dataclasses.dataclass(frozen=True)
class AsyncPair:
    collective: str  # all-gather, collective-permute, ...
    start: Instruction
    compute_between: int  # compute instructions scheduled between start and done
    bytes: int
    repeats: int  # times it runs per step (product of the trip counts of its loops)


@dataclasses.dataclass
class ProgramFacts:
    """What the checks and the roofline read from a compiled program."""

    instructions: list[Instruction]
    async_pairs: list[AsyncPair]
    sync_collectives: list[tuple[Instruction, int]]  # (instruction, repeats per step)
    loop_depth: dict[str, int]  # computation -> number of while loops around it
    splash_kernels: dict[str, int]  # fwd / dq / dkv -> instruction count

    def collective_bytes(self) -> dict[str, float]:
        """Bytes each kind of collective produces per step and device (result sizes x repeats)."""
        total: dict[str, float] = {}
        for pair in self.async_pairs:
            total[pair.collective] = total.get(pair.collective, 0) + pair.bytes * pair.repeats
        for instruction, repeats in self.sync_collectives:
            total[instruction.opcode] = total.get(instruction.opcode, 0) + instruction.bytes * repeats
        return total


def _loops(instructions: list[Instruction]) -> tuple[dict[str, int], dict[str, int]]:
    """(computation -> while loops around it, computation -> executions per step)."""
    by_computation: dict[str, list[Instruction]] = {}
    for i in instructions:
        by_computation.setdefault(i.computation, []).append(i)
    entry = instructions[-1].computation if instructions else ""
    depth, repeats = {entry: 0}, {entry: 1}
    stack = [entry]
    while stack:
        computation = stack.pop()
        for i in by_computation.get(computation, []):
            trips = _trip_count(i, by_computation) if i.opcode == "while" else 1
            for callee in _called(i):
                if callee in repeats:
                    continue
                depth[callee] = depth[computation] + (i.opcode == "while")
                repeats[callee] = repeats[computation] * trips
                stack.append(callee)
    return depth, repeats


def _trip_count(loop: Instruction, by_computation: dict[str, list[Instruction]]) -> int:
    """The bound the loop condition compares its counter with (the largest integer constant in it)."""
    condition = re.search(r"condition=(%[\w.\-]+)", loop.operands).group(1)
    bounds = [
        int(c)
        for i in by_computation.get(condition, [])
        if i.opcode == "constant" and i.shape.startswith("s32[]")
        for c in re.findall(r"^(-?\d+)\)", i.operands)
    ]
    return max(bounds, default=1)


def program_facts(text: str) -> ProgramFacts:
    """Async collective pairs (with the compute scheduled inside them), synchronous collectives, loop
    nesting and the splash kernels of a compiled TPU program's text.

    Async pairs are `<collective>-start`/`-done`, `async-start`/`-done` around a collective, and the
    continuation fusions of TPU v5e (`async-collective-start`/`-done` fusions whose computations end in
    the AsyncCollectiveStart/Done custom calls; the collective inside them is not a synchronous one)."""
    instructions = parse(text)
    depth, repeats = _loops(instructions)
    async_bodies = {c for i in instructions if i.opcode == "async-start" for c in _called(i)}
    continuation = {
        i.computation: role
        for i in instructions
        if i.opcode == "custom-call"
        for role in re.findall(r'custom_call_target="AsyncCollective(Start|Done)"', i.operands)
    }
    # the compute fusions a continuation carries its collective through (start -> these -> done)
    continuation |= {
        i.computation: "Step"
        for i in instructions
        if i.computation.startswith("%async_collective_fusion") and i.opcode in COLLECTIVES
    }
    collective_bodies = {
        i.computation: i.opcode
        for i in instructions
        if (i.computation in async_bodies or continuation.get(i.computation) == "Start")
        and i.opcode in COLLECTIVES
    }
    done_bodies = {c for c, role in continuation.items() if role == "Done"}
    position = {i.name: n for n, i in enumerate(instructions)}
    pairs, sync = [], []
    for n, i in enumerate(instructions):
        if (
            i.opcode in COLLECTIVES
            and i.computation not in async_bodies
            and i.computation not in continuation
        ):
            sync.append((i, repeats.get(i.computation, 1)))
        kind = _started_collective(i, collective_bodies)
        if kind is None:
            continue
        done = _done_of(i, instructions[n + 1 :], done_bodies)
        if done is None:
            continue
        between = instructions[n + 1 : position[done.name]]
        compute = sum(
            1
            for b in between
            if b.computation == i.computation
            and b.opcode not in _BOOKKEEPING
            and not b.opcode.endswith(("-start", "-done", "-update"))
            and not any(continuation.get(c) in ("Start", "Done") for c in _called(b))
        )
        pairs.append(AsyncPair(kind, i, compute, i.bytes, repeats.get(i.computation, 1)))
    kernels = {
        part: sum(1 for i in instructions if i.name.startswith(f"%splash_mha_{part}"))
        for part in ("fwd", "dq", "dkv")
    }
    return ProgramFacts(instructions, pairs, sync, depth, kernels)


def _started_collective(instruction: Instruction, collective_bodies: dict[str, str]) -> str | None:
    if instruction.opcode.endswith("-start") and instruction.opcode[: -len("-start")] in COLLECTIVES:
        return instruction.opcode[: -len("-start")]
    if instruction.opcode in ("async-start", "fusion"):
        return next((collective_bodies[c] for c in _called(instruction) if c in collective_bodies), None)
    return None


def _done_of(start: Instruction, after: list[Instruction], done_bodies: set[str]) -> Instruction | None:
    """The done that ends `start` (following async-update links; for a continuation fusion, the done
    fusion that takes elements of the start's tuple), in the same computation."""
    chain = {start.name}
    for i in after:
        if i.computation != start.computation:
            continue
        operands = _operand_names(i)
        if any(c in done_bodies for c in _called(i)) and set(operands) & chain:
            return i
        if not set(operands if start.opcode == "fusion" else operands[:1]) & chain:
            continue
        carried = start.opcode == "fusion" and (
            i.opcode == "get-tuple-element"
            or any(c.startswith("%async_collective_fusion") for c in _called(i))
        )
        if i.opcode.endswith("-update") or carried:
            chain.add(i.name)
        elif i.opcode.endswith("-done"):
            return i
    return None


# --- checks ------------------------------------------------------------------------------------------


def _dims(instruction: Instruction) -> tuple[int, ...]:
    """The result's dimensions without size-1 axes (the first array of a tuple)."""
    found = _ARRAY.search(instruction.shape)
    return tuple(int(d) for d in found.group(2).split(",") if d and int(d) != 1) if found else ()


def parameter_dims(layout, sharded: set[str] | None = None) -> dict[str, set[tuple[int, ...]]]:
    """Parameter dims (size-1 axes dropped) by kind: "layers" (the layer parameters split over the mesh:
    stacked dims and one layer's slice), "other" (split, outside the layers: embedding, LM head),
    "replicated" (every device holds all of it, e.g. norm scales), "stacked" (the stacked dims).
    `sharded` names the parameters split over the mesh (default: all)."""
    kinds: dict[str, set[tuple[int, ...]]] = {
        "layers": set(),
        "other": set(),
        "replicated": set(),
        "stacked": set(),
    }
    for name, shape in layout.shapes.items():
        dims = {tuple(d for d in shape.shape if d != 1)}
        in_layers = name.startswith("layers.")
        if in_layers and layout.cfg.scan_layers:
            kinds["stacked"] |= dims
            dims.add(tuple(d for d in shape.shape[1:] if d != 1))
        split = sharded is None or name in sharded
        kinds["replicated" if not split else "layers" if in_layers else "other"] |= dims
    return kinds


def sharded_parameters(trainer) -> set[str]:
    """Names of the trained parameters split over more than one device of the mesh."""
    shapes = trainer.layout.shapes
    return {
        name
        for name, sharding in trainer.shardings.params.items()
        if sharding.shard_shape(shapes[name].shape) != shapes[name].shape
    }


def describe(instruction: Instruction, repeats: int, name_chars: int | None = None) -> str:
    """`all-gather bf16[4096,14336] x32 (op name)`: a collective, its array, how often it runs, where
    it comes from (the last `name_chars` characters of its op name)."""
    op_name = instruction.op_name[-name_chars:] if name_chars else instruction.op_name
    array = _ARRAY.search(instruction.shape).group(0)
    return f"{instruction.opcode} {array} x{repeats} ({op_name or instruction.name})"


_PARAMETER_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter")


def check_program(facts: ProgramFacts, layout, sharded: set[str] | None = None) -> dict[str, list[str]]:
    """What the program should not contain, by rule; an empty list means the rule holds.

    - synchronous FSDP collectives in the layers: an all-gather or gradient all-reduce/reduce-scatter of
      a layer parameter split over the mesh (whole, or one layer's slice) that is not an async pair;
    - synchronous FSDP collectives outside the layers: the same for the split embedding and LM head
      (they run once per step, not once per layer);
    - async pairs with nothing scheduled between start and done (nothing overlaps them);
    - all-to-alls other than the embedding lookup's resharding (its gather and scatter-add);
    - stacked-layer parameters gathered whole (outside the layer scan);
    - attention not done by the splash kernel (a missing forward/backward kernel, or XLA's attention).

    Gradient all-reduces of replicated parameters (norm scales) are data-parallel reductions, not FSDP
    traffic (no all-gather or reduce-scatter exists for them): `replicated_all_reduces` lists them.
    """
    kinds = parameter_dims(layout, sharded)
    gathers = [p.start for p in facts.async_pairs if p.collective == "all-gather"]
    gathers += [i for i, _ in facts.sync_collectives if i.opcode == "all-gather"]
    parameter_sync = [(i, r) for i, r in facts.sync_collectives if i.opcode in _PARAMETER_COLLECTIVES]
    return {
        "synchronous FSDP collectives in the layers": [
            describe(i, r) for i, r in parameter_sync if _dims(i) in kinds["layers"]
        ],
        "synchronous FSDP collectives outside the layers": [
            describe(i, r)
            for i, r in parameter_sync
            if _dims(i) in kinds["other"] and _dims(i) not in kinds["layers"]
        ],
        "async pairs without compute between": [
            describe(p.start, p.repeats) for p in facts.async_pairs if p.compute_between == 0
        ],
        "unexpected all-to-all": [
            describe(i, r)
            for i, r in facts.sync_collectives + [(p.start, p.repeats) for p in facts.async_pairs]
            if i.opcode.startswith("all-to-all") and not i.op_name.endswith(("/gather", "/scatter-add"))
        ],
        "whole stacked parameters gathered": [i.name for i in gathers if _dims(i) in kinds["stacked"]],
        "attention not by splash": [f"no splash {k} kernel" for k, n in facts.splash_kernels.items() if not n]
        + [i.name for i in facts.instructions if "bkgts" in i.op_name][:5],
    }


def replicated_all_reduces(facts: ProgramFacts, layout, sharded: set[str] | None = None) -> list[str]:
    """Synchronous all-reduces shaped like a replicated parameter and like no split one (norm-scale
    gradients): data-parallel reductions, listed apart from the FSDP rules."""
    kinds = parameter_dims(layout, sharded)
    split = kinds["layers"] | kinds["other"]
    return [
        describe(i, r, 60)
        for i, r in facts.sync_collectives
        if i.opcode == "all-reduce" and _dims(i) in kinds["replicated"] and _dims(i) not in split
    ]


def async_summary(facts: ProgramFacts) -> dict[str, int]:
    """Async pairs by collective, e.g. {'collective-permute': 105}, and how many have compute between."""
    out: dict[str, int] = {}
    for pair in facts.async_pairs:
        out[pair.collective] = out.get(pair.collective, 0) + 1
        key = f"{pair.collective} overlapped"
        out[key] = out.get(key, 0) + (pair.compute_between > 0)
    return out


# --- roofline ----------------------------------------------------------------------------------------

# Published per-chip peaks (one JAX device): dense bf16 FLOP/s, HBM bytes/s, ICI bytes/s (all links).
# Sources: cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 2765 GB/s HBM, 4800 Gbps ICI),
# cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 819 GB/s HBM, 1600 Gbps ICI) and
# cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 1640 GB/s HBM, 3584 Gbps ICI).
CHIP_PEAKS: dict[str, tuple[float, float, float]] = {
    "v5p": (459e12, 2765e9, 4800e9 / 8),
    "v5e": (197e12, 819e9, 1600e9 / 8),
    "v6e": (918e12, 1640e9, 3584e9 / 8),
}


def wire_bytes(facts: ProgramFacts, devices: int) -> tuple[float, float]:
    """(bytes each device sends through async collectives, through synchronous ones) per step.

    A ring all-gather or all-to-all of a result of S bytes moves S (n-1)/n per device, an all-reduce
    twice that, a collective-permute S; result sizes and loop trip counts come from the program."""
    share = (devices - 1) / devices
    factor = {"all-gather": share, "all-to-all": share, "reduce-scatter": share, "all-reduce": 2 * share}

    def moved(opcode: str, size: int, repeats: int) -> float:
        return factor.get(opcode, 1.0) * size * repeats

    overlapped = sum(moved(p.collective, p.bytes, p.repeats) for p in facts.async_pairs)
    blocking = sum(moved(i.opcode, i.bytes, r) for i, r in facts.sync_collectives)
    return overlapped, blocking


def roofline(facts: ProgramFacts, trainer, topology: str) -> dict[str, float]:
    """Expected step time and MFU: compute and HBM time overlap the async collectives; synchronous
    collectives add to it. Compute time and MFU count the same model FLOPs, `flops.mfu_flops_per_token`
    (causal attention; `flops.MFU_DEFINITION`, the training log's MFU), so MFU = compute time / step
    time <= 1."""
    from jsft import flops

    chip = topology.split("-")[0]
    peak, hbm, ici = CHIP_PEAKS[chip]
    devices = trainer.mesh.size
    seq = trainer.cfg.data.max_seq_length
    tokens = trainer.cfg.train.global_batch_size * seq
    model = trainer.layout.cfg
    model_flops = flops.mfu_flops_per_token(model, seq) * tokens / devices
    compute = model_flops / peak
    # HBM floor: the gathered bf16 weights read in the forward, the backward and the recomputation
    # of each micro-batch, and the float32 state (parameters, gradients, two moments) read and written.
    params = model.num_params()
    streamed = 3 * 2 * params * trainer.cfg.train.grad_accum_steps + 2 * 4 * 4 * params / devices
    memory = streamed / hbm
    overlapped, blocking = wire_bytes(facts, devices)
    step = max(compute, memory, overlapped / ici) + blocking / ici
    mfu = model_flops / (step * peak)
    return {
        "compute_s": compute,
        "hbm_s": memory,
        "async_collectives_s": overlapped / ici,
        "sync_collectives_s": blocking / ici,
        "step_s": step,
        "mfu": mfu,
        "async_bytes": overlapped,
        "sync_bytes": blocking,
    }


# --- command line ------------------------------------------------------------------------------------


def topology_report(cfg, topology: str) -> dict:
    """Compiles the config's train step for a TPU slice: memory, async pairs, rule violations, roofline."""
    from jsft import flops, plan
    from jsft.models import shapes

    hf_config, _ = shapes.hf_config(cfg.model.path, cfg.model.revision)
    trainer = plan.build_trainer(cfg, hf_config, topology_devices(topology))
    _, memory, text = plan.compile_step(trainer, with_text=True)
    if memory.refused:
        raise TopologyError(f"the train step does not fit {topology}: {memory.refused}")
    facts = program_facts(text)
    sharded = sharded_parameters(trainer)
    return {
        "topology": topology,
        "devices": trainer.mesh.size,
        "mesh": dict(trainer.mesh.shape),
        "memory_gib": {k: v / GIB for k, v in dataclasses.asdict(memory).items() if k != "refused"},
        "device_memory_gib": device_memory(topology) / GIB,
        "async_pairs": async_summary(facts),
        "sync_collectives": [describe(i, r, 60) for i, r in facts.sync_collectives],
        "collective_gib_per_step": {k: v / GIB for k, v in facts.collective_bytes().items()},
        "splash_kernels": facts.splash_kernels,
        "problems": check_program(facts, trainer.layout, sharded),
        "replicated_all_reduces": replicated_all_reduces(facts, trainer.layout, sharded),
        "roofline": roofline(facts, trainer, topology),
        "mfu_definition": flops.MFU_DEFINITION,
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
    }


# What tools/tpu_check.py and tools/roofline.py compile unless told otherwise.
TOOL_DEFAULTS = ("--topology=v5p-64,v6e-64", "--config=configs/tulu.py", "--config.model.attention=splash")


def with_tool_defaults(argv: list[str]) -> list[str]:
    """`argv` with each of TOOL_DEFAULTS it does not set itself added (the program name stays first)."""
    given = {a.split("=", 1)[0] for a in argv[1:]}
    return [argv[0], *(a for a in TOOL_DEFAULTS if a.split("=", 1)[0] not in given), *argv[1:]]


def reports(argv: list[str]) -> Iterator[tuple[str, dict]]:
    """(topology, `topology_report`) for each of `--topology=A[,B]` with `--config=FILE [--config.KEY=V]`;
    a missing topology, a bad config or an unknown topology ends the program with one line."""
    import sys

    names = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--topology=")]
    if not names:
        sys.exit(f"{argv[0]}: give --topology=NAME[,NAME] (" + ", ".join(TOPOLOGIES) + ")")
    prepare_environment()
    from jsft import config
    from jsft.errors import JsftError

    files = [a for a in argv[1:] if a.startswith("--config=")]  # the file before its overrides
    overrides = [a for a in argv[1:] if not a.startswith(("--topology=", "--config="))]
    cfg = config.load_or_exit([argv[0], *files, *overrides])
    try:
        for name in names[-1].split(","):
            yield name, topology_report(cfg, name)
    except (JsftError, TopologyError) as e:
        sys.exit(f"{argv[0]}: {e}")


def main(argv: list[str] | None = None) -> None:
    """`python -m jsft.tpu --topology=v5p-64[,v6e-64] --config=FILE [--config.KEY=VALUE]`: one JSON
    report per topology (tools/tpu_check.py and tools/roofline.py print them for people)."""
    import json
    import sys

    for _, report in reports(["jsft.tpu", *(sys.argv if argv is None else argv)[1:]]):
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
