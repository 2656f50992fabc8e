"""Facts read from a compiled XLA program's text: its instructions, loops, async collective pairs.

The text is the compiler's own dump (`compiled.compile_with_text`): `Compiled.as_text()` re-parses
the program and fails on the SparseCore offload instructions large embedding gathers compile to.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Ops that do work on the core while a collective is in flight (anything but bookkeeping).
BOOKKEEPING = {
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
ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}
# An array with its layout: TPU layouts name a memory space, S(n); none (or S(0)) is HBM, S(1) the core's
# VMEM, S(5) the host, S(2)/S(6) scalar memories.
_PLACED_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\](\{[^}]*\})?")


def _memory_space(layout: str) -> int:
    space = re.search(r"S\((\d+)\)", layout)
    return int(space.group(1)) if space else 0


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
            for dtype, dims in ARRAY.findall(self.shape)
        ]
        return max(sizes, default=0)

    @property
    def hbm_bytes(self) -> int:
        """Bytes of the result's arrays that live in HBM (every array of a tuple; none in VMEM, on the
        host or in scalar memory)."""
        return sum(
            _BYTES.get(dtype, 4 if dtype[-2:] == "32" else 8)
            * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims, layout in _PLACED_ARRAY.findall(self.shape)
            if _memory_space(layout) == 0
        )

    @property
    def dims(self) -> tuple[int, ...]:
        """The result's dimensions without size-1 axes (the first array of a tuple)."""
        found = ARRAY.search(self.shape)
        return tuple(int(d) for d in found.group(2).split(",") if d and int(d) != 1) if found else ()


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


def called(instruction: Instruction) -> list[str]:
    """Computations an instruction runs: fusion/call/async bodies, while body and condition, branches."""
    names = re.findall(r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)", instruction.operands)
    branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.operands)
    return names + (re.findall(r"%[\w.\-]+", branches.group(1)) if branches else [])


def operand_names(instruction: Instruction) -> list[str]:
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
    repeats: dict[str, int]  # computation -> executions per step (product of its loops' trip counts)

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
    by_name = {i.name: i for i in instructions}
    entry = instructions[-1].computation if instructions else ""
    depth, repeats = {entry: 0}, {entry: 1}
    stack = [entry]
    while stack:
        computation = stack.pop()
        for i in by_computation.get(computation, []):
            trips = _trip_count(i, by_computation, by_name) if i.opcode == "while" else 1
            for callee in called(i):
                if callee in repeats:
                    continue
                depth[callee] = depth[computation] + (i.opcode == "while")
                repeats[callee] = repeats[computation] * trips
                stack.append(callee)
    return depth, repeats


def _trip_count(
    loop: Instruction, by_computation: dict[str, list[Instruction]], by_name: dict[str, Instruction]
) -> int:
    """How many times the loop body runs: XLA's own `known_trip_count` where it annotated the loop; else
    from the loop's counter (its start in the loop's operand, its step in the body, the bound and
    comparison in the condition, in any integer type: the TPU's collective-matmul loops count in u32,
    from 2 by 2 below 16); else the largest integer constant in the condition."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.operands)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=(%[\w.\-]+)", loop.operands).group(1)
    counted = _counted_trips(loop, condition, by_computation, by_name)
    if counted is not None:
        return counted
    bounds = [
        int(c)
        for i in by_computation.get(condition, [])
        if i.opcode == "constant" and re.match(r"[su](8|16|32|64)\[\]", i.shape)
        for c in re.findall(r"^(-?\d+)\)", i.operands)
    ]
    return max(bounds, default=1)


def _counted_trips(
    loop: Instruction, condition: str, by_computation: dict[str, list[Instruction]], by_name: dict
) -> int | None:
    """Trips of `counter < bound` (or <=, !=, >, >=) with a constant start and step, None when the loop
    is not of that form."""
    compared = _binary(by_computation.get(condition, [None])[-1], "compare", by_computation, by_name)
    if compared is None:
        return None
    (left, right), direction = compared
    if left[0] == "constant":
        (left, right), direction = (
            (right, left),
            {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, direction),
        )
    if left[0] != "counter" or right[0] != "constant":
        return None
    index, bound = left[1], right[1]
    start = _element(by_name.get(next(iter(operand_names(loop)), "")), index, by_name)
    body = re.search(r"body=(%[\w.\-]+)", loop.operands).group(1)
    update = _element(by_computation.get(body, [None])[-1], index, by_name, resolve=False)
    added = _binary(update, "add", by_computation, by_name) if update else None
    if start is None or start[0] != "constant" or added is None:
        return None
    (a, b), _ = added
    if not ({a[0], b[0]} == {"counter", "constant"} and index in (a[1], b[1])):
        return None
    begin, step = start[1], (b if b[0] == "constant" else a)[1]
    span = {"LT": bound - begin, "LE": bound - begin + step, "NE": bound - begin}.get(direction)
    if direction in ("GT", "GE") and step < 0:
        span, step = begin - bound + (-step if direction == "GE" else 0), -step
    if span is None or step <= 0:
        return None
    return max(-(-span // step), 0)


def _value(name: str, by_name: dict[str, Instruction]) -> tuple[str, int] | None:
    """("constant", value) or ("counter", tuple index) of an operand, through copies and conversions."""
    i = by_name.get(name)
    while i is not None and i.opcode in ("copy", "bitcast", "convert"):
        i = by_name.get(next(iter(operand_names(i)), ""))
    if i is None:
        return None
    if i.opcode == "constant":
        value = re.match(r"(-?\d+)\)", i.operands)
        return ("constant", int(value.group(1))) if value else None
    if i.opcode == "get-tuple-element":
        return ("counter", int(re.search(r"index=(\d+)", i.operands).group(1)))
    return None


def _element(tuple_: Instruction | None, index: int, by_name: dict, resolve: bool = True):
    """Element `index` of a `tuple` instruction: its value (`_value`), or with resolve=False the
    instruction itself."""
    if tuple_ is None or tuple_.opcode != "tuple":
        return None
    names = operand_names(tuple_)
    if index >= len(names):
        return None
    return _value(names[index], by_name) if resolve else by_name.get(names[index])


def _binary(i: Instruction | None, opcode: str, by_computation: dict, by_name: dict):
    """((left value, right value), compare direction) of a binary `opcode` instruction, or of a fusion
    whose computation is one (operands mapped through its parameters), else None."""
    if i is None:
        return None
    operands = operand_names(i)
    if i.opcode == "fusion":
        fused = by_computation.get(next(iter(called(i)), ""), [])
        inner = [f for f in fused if f.opcode == opcode]
        if len(inner) != 1:
            return None
        parameters = {
            f.name: int(re.match(r"(\d+)\)", f.operands).group(1)) for f in fused if f.opcode == "parameter"
        }
        inner_operands = operand_names(inner[0])
        if not all(name in parameters for name in inner_operands):
            return None
        operands, i = [operands[parameters[name]] for name in inner_operands], inner[0]
    if i.opcode != opcode or len(operands) != 2:
        return None
    values = (_value(operands[0], by_name), _value(operands[1], by_name))
    if None in values:
        return None
    direction = re.search(r"direction=(\w+)", i.operands)
    return values, direction.group(1) if direction else None


def program_facts(text: str) -> ProgramFacts:
    """Async collective pairs (with the compute scheduled inside them), synchronous collectives, loop
    nesting and the splash kernels of a compiled TPU program's text.

    Async pairs are `<collective>-start`/`-done`, `async-start`/`-done` around a collective, and the
    continuation fusions of TPU v5e (`async-collective-start`/`-done` fusions whose computations end in
    the AsyncCollectiveStart/Done custom calls; the collective inside them is not a synchronous one)."""
    instructions = parse(text)
    depth, repeats = _loops(instructions)
    async_bodies = {c for i in instructions if i.opcode == "async-start" for c in called(i)}
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
            and b.opcode not in BOOKKEEPING
            and not b.opcode.endswith(("-start", "-done", "-update"))
            and not any(continuation.get(c) in ("Start", "Done") for c in called(b))
        )
        pairs.append(AsyncPair(kind, i, compute, i.bytes, repeats.get(i.computation, 1)))
    kernels = {
        part: sum(1 for i in instructions if i.name.startswith(f"%splash_mha_{part}"))
        for part in ("fwd", "dq", "dkv")
    }
    return ProgramFacts(instructions, pairs, sync, depth, kernels, repeats)


def _started_collective(instruction: Instruction, collective_bodies: dict[str, str]) -> str | None:
    if instruction.opcode.endswith("-start") and instruction.opcode[: -len("-start")] in COLLECTIVES:
        return instruction.opcode[: -len("-start")]
    if instruction.opcode in ("async-start", "fusion"):
        return next((collective_bodies[c] for c in called(instruction) if c in collective_bodies), None)
    return None


def _done_of(start: Instruction, after: list[Instruction], done_bodies: set[str]) -> Instruction | None:
    """The done that ends `start` (following async-update links; for a continuation fusion, the done
    fusion that takes elements of the start's tuple), in the same computation."""
    chain = {start.name}
    for i in after:
        if i.computation != start.computation:
            continue
        operands = operand_names(i)
        if any(c in done_bodies for c in called(i)) and set(operands) & chain:
            return i
        if not set(operands if start.opcode == "fusion" else operands[:1]) & chain:
            continue
        carried = start.opcode == "fusion" and (
            i.opcode == "get-tuple-element"
            or any(c.startswith("%async_collective_fusion") for c in called(i))
        )
        if i.opcode.endswith("-update") or carried:
            chain.add(i.name)
        elif i.opcode.endswith("-done"):
            return i
    return None


def describe(instruction: Instruction, repeats: int, name_chars: int | None = None) -> str:
    """`all-gather bf16[4096,14336] x32 (op name)`: a collective, its array, how often it runs, where
    it comes from (the last `name_chars` characters of its op name)."""
    op_name = instruction.op_name[-name_chars:] if name_chars else instruction.op_name
    array = ARRAY.search(instruction.shape).group(0)
    return f"{instruction.opcode} {array} x{repeats} ({op_name or instruction.name})"
