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


def prepare_environment() -> None:
    """Environment for compiling TPU programs on this machine; call before JAX initialises.

    JAX's own backend stays CPU. Several processes may load libtpu at once (other JAX processes of
    the machine hold its lock file otherwise), and no cloud metadata server is asked for a TPU.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


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
    nesting and the splash kernels of a compiled TPU program's text."""
    instructions = parse(text)
    depth, repeats = _loops(instructions)
    by_name = {i.name: i for i in instructions}
    async_bodies = {c for i in instructions if i.opcode == "async-start" for c in _called(i)}
    collective_bodies = {
        i.computation: i.opcode
        for i in instructions
        if i.computation in async_bodies and i.opcode in COLLECTIVES
    }
    position = {i.name: n for n, i in enumerate(instructions)}
    pairs, sync = [], []
    for n, i in enumerate(instructions):
        if i.opcode in COLLECTIVES and i.computation not in async_bodies:
            sync.append((i, repeats.get(i.computation, 1)))
        kind = _started_collective(i, collective_bodies)
        if kind is None:
            continue
        done = _done_of(i, instructions[n + 1 :], by_name)
        if done is None:
            continue
        between = instructions[n + 1 : position[done.name]]
        compute = sum(
            1
            for b in between
            if b.computation == i.computation
            and b.opcode not in _BOOKKEEPING
            and not b.opcode.endswith(("-start", "-done", "-update"))
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
    if instruction.opcode == "async-start":
        return next((collective_bodies[c] for c in _called(instruction) if c in collective_bodies), None)
    return None


def _done_of(start: Instruction, after: list[Instruction], by_name: dict) -> Instruction | None:
    """The done that ends `start` (following async-update links), in the same computation."""
    chain = {start.name}
    for i in after:
        if i.computation != start.computation or not set(_operand_names(i)[:1]) & chain:
            continue
        if i.opcode.endswith("-update"):
            chain.add(i.name)
        elif i.opcode.endswith("-done"):
            return i
    return None


# --- checks ------------------------------------------------------------------------------------------


def _dims(instruction: Instruction) -> tuple[int, ...]:
    """The result's dimensions without size-1 axes (the first array of a tuple)."""
    found = _ARRAY.search(instruction.shape)
    return tuple(int(d) for d in found.group(2).split(",") if d and int(d) != 1) if found else ()


def parameter_dims(layout) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
    """(every parameter's full dims and its one-layer slice, size-1 axes dropped; the stacked dims)."""
    full, stacked = set(), set()
    for name, shape in layout.shapes.items():
        dims = tuple(d for d in shape.shape if d != 1)
        full.add(dims)
        if name.startswith("layers.") and layout.cfg.scan_layers:
            stacked.add(dims)
            full.add(tuple(d for d in shape.shape[1:] if d != 1))
    return full, stacked


def check_program(facts: ProgramFacts, layout) -> dict[str, list[str]]:
    """What the program should not contain, by rule; an empty list means the rule holds.

    - synchronous parameter collectives: an all-gather or gradient all-reduce/reduce-scatter of a whole
      parameter (or one layer's slice) that is not an async start/done pair;
    - async pairs with nothing scheduled between start and done (nothing overlaps them);
    - all-to-alls other than the embedding lookup's resharding (its gather and scatter-add);
    - stacked-layer parameters gathered whole (outside the layer scan);
    - attention not done by the splash kernel (a missing forward/backward kernel, or XLA's attention).
    """
    full, stacked = parameter_dims(layout)
    describe = lambda i, r: f"{i.opcode} {_ARRAY.search(i.shape).group(0)} x{r} ({i.op_name or i.name})"  # noqa: E731
    gathers = [p.start for p in facts.async_pairs if p.collective == "all-gather"]
    gathers += [i for i, _ in facts.sync_collectives if i.opcode == "all-gather"]
    return {
        "synchronous parameter collectives": [
            describe(i, r)
            for i, r in facts.sync_collectives
            if i.opcode in ("all-gather", "all-reduce", "reduce-scatter") and _dims(i) in full
        ],
        "async pairs without compute between": [
            describe(p.start, p.repeats) for p in facts.async_pairs if p.compute_between == 0
        ],
        "unexpected all-to-all": [
            describe(i, r)
            for i, r in facts.sync_collectives + [(p.start, p.repeats) for p in facts.async_pairs]
            if i.opcode.startswith("all-to-all") and not i.op_name.endswith(("/gather", "/scatter-add"))
        ],
        "whole stacked parameters gathered": [i.name for i in gathers if _dims(i) in stacked],
        "attention not by splash": [f"no splash {k} kernel" for k, n in facts.splash_kernels.items() if not n]
        + [i.name for i in facts.instructions if "bkgts" in i.op_name][:5],
    }


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
# Sources: cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 2765 GB/s HBM, 4800 Gbps ICI) and
# cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 1640 GB/s HBM, 3584 Gbps ICI).
CHIP_PEAKS: dict[str, tuple[float, float, float]] = {
    "v5p": (459e12, 2765e9, 4800e9 / 8),
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
    collectives add to it. Model FLOPs are jsft.flops' (causal attention executed, PaLM's count for MFU)."""
    from jsft import flops

    chip = topology.split("-")[0]
    peak, hbm, ici = CHIP_PEAKS[chip]
    devices = trainer.mesh.size
    seq = trainer.cfg.data.max_seq_length
    tokens = trainer.cfg.train.global_batch_size * seq
    model = trainer.layout.cfg
    compute = flops.flops_per_token(model, seq, causal=True) * tokens / devices / peak
    # HBM floor: the gathered bf16 weights read in the forward, the backward and the recomputation
    # of each micro-batch, and the float32 state (parameters, gradients, two moments) read and written.
    params = model.num_params()
    streamed = 3 * 2 * params * trainer.cfg.train.grad_accum_steps + 2 * 4 * 4 * params / devices
    memory = streamed / hbm
    overlapped, blocking = wire_bytes(facts, devices)
    step = max(compute, memory, overlapped / ici) + blocking / ici
    mfu = flops.flops_per_token(model, seq) * tokens / devices / (step * peak)
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
    from jsft import plan
    from jsft.models import shapes

    hf_config, _ = shapes.hf_config(cfg.model.path, cfg.model.revision)
    trainer = plan.build_trainer(cfg, hf_config, topology_devices(topology))
    _, memory, text = plan.compile_step(trainer, with_text=True)
    facts = program_facts(text)
    return {
        "topology": topology,
        "devices": trainer.mesh.size,
        "mesh": dict(trainer.mesh.shape),
        "memory_gib": {k: v / GIB for k, v in dataclasses.asdict(memory).items()},
        "device_memory_gib": device_memory(topology) / GIB,
        "async_pairs": async_summary(facts),
        "sync_collectives": [
            f"{i.opcode} {_ARRAY.search(i.shape).group(0)} x{r} ({i.op_name[-60:] or i.name})"
            for i, r in facts.sync_collectives
        ],
        "collective_gib_per_step": {k: v / GIB for k, v in facts.collective_bytes().items()},
        "splash_kernels": facts.splash_kernels,
        "problems": check_program(facts, trainer.layout),
        "roofline": roofline(facts, trainer, topology),
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
