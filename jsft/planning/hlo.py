"""Facts read from a compiled XLA program's text: its instructions, loops, async collective pairs.

The text is the compiler's own dump (`compiled.compile_with_text`): `Compiled.as_text()` re-parses
the program and fails on the SparseCore offload instructions large embedding gathers compile to.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

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
# An array with its layout: TPU layouts name a memory space, S(n); none (or S(0)) is HBM, S(1) the core's
# VMEM, S(5) the host, S(2)/S(6) scalar memories.
_PLACED_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\](\{[^}]*\})?")


def _memory_space(layout: str) -> int:
    space = re.search(r"S\((\d+)\)", layout)
    return int(space.group(1)) if space else 0


# Top-level ops that move no HBM bytes of their own: bookkeeping, control flow (their bodies are counted),
# collectives (ICI traffic, `wire_bytes`) and the ends of async ops whose start is counted.
_NO_HBM_WORK = _BOOKKEEPING - {"copy-start"} | {
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "send",
    "send-done",
    "recv",
    "recv-done",
    *COLLECTIVES,
}


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
        found = _ARRAY.search(self.shape)
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
    repeats: dict[str, int]  # computation -> executions per step (product of its loops' trip counts)

    def collective_bytes(self) -> dict[str, float]:
        """Bytes each kind of collective produces per step and device (result sizes x repeats)."""
        total: dict[str, float] = {}
        for pair in self.async_pairs:
            total[pair.collective] = total.get(pair.collective, 0) + pair.bytes * pair.repeats
        for instruction, repeats in self.sync_collectives:
            total[instruction.opcode] = total.get(instruction.opcode, 0) + instruction.bytes * repeats
        return total

    def op_costs(self) -> list[OpCost]:
        """Each op the chip runs, with its matmul FLOPs and HBM bytes (`OpCost`)."""
        return _op_costs(self)

    def matmul_flops(self) -> float:
        """FLOPs per step and device of the program's dots and convolutions (the TPU compiler writes
        its matmuls as convolutions), each times the trips of the loops around it. `cost_analysis()`
        counts a loop body once, so a scanned model's layers count as one layer there. Both branches
        of a conditional count (as if each ran), and zeros a convolution's padding adds do not."""
        by_name = {i.name: i for i in self.instructions}
        return sum(
            _matmul_flops(i, by_name) * self.repeats.get(i.computation, 1)
            for i in self.instructions
            if i.opcode in ("dot", "convolution")
        )


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One op the chip runs (a fusion, an unfused matmul, a copy, a kernel), per execution."""

    instruction: Instruction
    flops: float  # matmul FLOPs (dots and convolutions; a splash kernel's by its shapes)
    hbm_bytes: float  # bytes it reads from and writes to HBM
    repeats: int  # executions per step


def _op_costs(facts: ProgramFacts) -> list[OpCost]:
    """The program's ops as the chip runs them: the instructions of the entry, loop bodies and branches
    (not those inside fusions, reducers and async wrappers, which their op accounts for)."""
    instructions = facts.instructions
    by_name = {i.name: i for i in instructions}
    by_computation: dict[str, list[Instruction]] = {}
    for i in instructions:
        by_computation.setdefault(i.computation, []).append(i)
    inner = set()
    for i in instructions:
        if i.opcode in ("fusion", "async-start"):
            inner.update(_called(i))
        elif i.opcode not in ("while", "conditional", "call"):
            inner.update(re.findall(r"to_apply=(%[\w.\-]+)", i.operands))
    costs = []
    for i in instructions:
        if i.computation in inner or i.opcode in _NO_HBM_WORK or i.opcode.endswith(("-done", "-update")):
            continue
        if i.opcode.endswith("-start") and i.opcode != "copy-start" or i.opcode == "async-start":
            continue  # collectives and other async work: ICI or their own wrapped op
        if i.opcode == "copy-start":  # (destination, source, context): the HBM sides of one DMA
            moved = i.hbm_bytes
        elif i.opcode == "fusion":
            moved = _fusion_hbm_bytes(i, by_computation, by_name)
        else:
            moved = i.hbm_bytes + sum(by_name[n].hbm_bytes for n in _operand_names(i) if n in by_name)
        flops = 0.0
        if i.opcode in ("dot", "convolution"):
            flops = _matmul_flops(i, by_name)
        elif i.opcode == "fusion":
            flops = sum(
                _matmul_flops(f, by_name)
                for c in _called(i)
                for f in by_computation.get(c, [])
                if f.opcode in ("dot", "convolution")
            )
        elif i.name.startswith("%splash_mha_"):
            flops = _splash_flops(i, by_name)
        costs.append(OpCost(i, flops, moved, facts.repeats.get(i.computation, 1)))
    return costs


def _fusion_hbm_bytes(fusion: Instruction, by_computation: dict, by_name: dict) -> float:
    """HBM bytes a fusion moves: each operand read whole, except one that is only sliced (the slices
    are read: a scanned layer's weights out of the stacked ones) or that is the buffer a
    dynamic-update-slice writes in place (only the update is written: a scanned layer's residuals into
    the stacked ones); and its HBM results."""
    body = by_computation.get(next(iter(_called(fusion)), ""), [])
    users: dict[str, list[Instruction]] = {}
    for f in body:
        for n in _operand_names(f):
            users.setdefault(n, []).append(f)
    parameters = {
        int(re.match(r"(\d+)\)", f.operands).group(1)): f.name for f in body if f.opcode == "parameter"
    }
    root = body[-1] if body else None
    roots = [by_name_in(body, n) for n in _operand_names(root)] if root and root.opcode == "tuple" else [root]
    roots = [by_name_in(body, _through_bitcasts(r.name, body)) for r in roots if r is not None]
    in_place = [r for r in roots if r is not None and r.opcode == "dynamic-update-slice"]
    buffers = {_through_bitcasts(_operand_names(r)[0], body) for r in in_place}

    def read(index: int, operand: Instruction) -> float:
        name = parameters.get(index)
        if name is None or operand.hbm_bytes == 0:
            return operand.hbm_bytes
        if name in buffers:
            return 0.0
        sliced = _sliced_bytes(name, users)
        return operand.hbm_bytes if sliced is None else min(operand.hbm_bytes, sliced)

    operands = [by_name.get(n) for n in _operand_names(fusion)]
    reads = sum(read(k, o) for k, o in enumerate(operands) if o is not None)
    written = fusion.hbm_bytes
    if in_place:  # the fusion's result is the updated buffer: only the updates are written
        updates = sum(by_name_in(body, _operand_names(r)[1]).hbm_bytes for r in in_place)
        whole = sum(r.hbm_bytes for r in in_place)
        written = max(written - whole, 0) + (updates if fusion.hbm_bytes else 0)
    return reads + written


def by_name_in(body: list[Instruction], name: str) -> Instruction | None:
    return next((f for f in body if f.name == name), None)


def _through_bitcasts(name: str, body: list[Instruction]) -> str:
    """The parameter (or other instruction) behind bitcasts of `name` inside a fused computation."""
    i = by_name_in(body, name)
    while i is not None and i.opcode == "bitcast":
        name = _operand_names(i)[0]
        i = by_name_in(body, name)
    return name


def _sliced_bytes(name: str, users: dict[str, list[Instruction]]) -> int | None:
    """Bytes the slices of `name` read inside a fused computation (through bitcasts), None unless every
    reader is a slice, dynamic slice or gather of it."""
    total = 0
    for u in users.get(name, []):
        if u.opcode == "bitcast":
            inner = _sliced_bytes(u.name, users)
            if inner is None:
                return None
            total += inner
        elif u.opcode in ("dynamic-slice", "slice", "gather") and _operand_names(u)[0] == name:
            total += u.hbm_bytes
        else:
            return None
    return total if users.get(name) else None


# Matmuls per splash kernel: the forward's q.k and p.v; dq's recomputed q.k, do.v and ds.k; dkv's
# recomputed q.k, p.do, do.v and ds.q. Each [heads, q, k] x head_dim, about half of it under the causal mask.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(kernel: Instruction, by_name: dict) -> float:
    """A splash attention kernel's FLOPs from its q and k operands ([.., heads, q_len, head_dim] and
    [.., kv_heads, k_len, head_dim], its first two floating arrays): 2 x matmuls x rows x heads x q_len
    x k_len x head_dim, halved for the causal mask."""
    part = next((p for p in ("fwd", "dkv", "dq") if kernel.name.startswith(f"%splash_mha_{p}")), None)
    tensors = [
        _full_dims(by_name[n])
        for n in _operand_names(kernel)
        if n in by_name and re.match(r"\(?(bf16|f16|f32)\[\d+,\d+,\d+", by_name[n].shape)
    ]  # the block masks before q, k and v are integers
    if part is None or len(tensors) < 2:
        return 0.0
    q, k = tensors[:2]
    return 2.0 * _SPLASH_MATMULS[part] * math.prod(q[:-1]) * k[-2] * q[-1] / 2


def _full_dims(instruction: Instruction | None) -> tuple[int, ...]:
    """All dimensions of an instruction's result (of the first array of a tuple), size-1 axes kept."""
    found = _ARRAY.search(instruction.shape) if instruction else None
    if found is None:
        raise ValueError(f"no array shape for {instruction.name if instruction else 'a missing operand'}")
    return tuple(int(d) for d in found.group(2).split(",") if d)


def _matmul_flops(i: Instruction, by_name: dict[str, Instruction]) -> float:
    """2 x the multiply-adds of one dot or convolution (XLA's HloCostAnalysis count)."""
    lhs, rhs = (_full_dims(by_name.get(n)) for n in _operand_names(i)[:2])
    out = _full_dims(i)
    if i.opcode == "dot":
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.operands).group(1)
        return 2.0 * math.prod(out) * math.prod(lhs[int(d)] for d in contracted.split(",") if d)
    lhs_labels, rhs_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.operands).groups()
    window = re.search(r"window=\{([^}]*)\}", i.operands)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    sizes = [int(x) for x in fields["size"].split("x")] if "size" in fields else []

    def per_dim(key: str, default: int) -> list[int]:
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * len(sizes)

    pads = [int(x.split("_")[0]) for x in fields["pad"].split("x")] if "pad" in fields else [0] * len(sizes)
    strides, lhs_dilation, rhs_dilation = (
        per_dim("stride", 1),
        per_dim("lhs_dilate", 1),
        per_dim("rhs_dilate", 1),
    )
    valid = 1
    for d in range(len(sizes)):
        size_in = (lhs[lhs_labels.index(str(d))] - 1) * lhs_dilation[d] + 1
        o = np.arange(out[out_labels.index(str(d))])[:, None]
        k = np.arange(rhs[rhs_labels.index(str(d))])[None, :]
        position = o * strides[d] - pads[d] + k * rhs_dilation[d]
        valid *= int(np.sum((position >= 0) & (position < size_in) & (position % lhs_dilation[d] == 0)))
    groups = re.search(r"feature_group_count=(\d+)", i.operands)
    batch_groups = re.search(r"batch_group_count=(\d+)", i.operands)
    features_in = lhs[lhs_labels.index("f")] // (int(groups.group(1)) if groups else 1)
    batch = lhs[lhs_labels.index("b")] // (int(batch_groups.group(1)) if batch_groups else 1)
    return 2.0 * features_in * rhs[rhs_labels.index("o")] * batch * valid


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
            for callee in _called(i):
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
    start = _element(by_name.get(next(iter(_operand_names(loop)), "")), index, by_name)
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
        i = by_name.get(next(iter(_operand_names(i)), ""))
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
    names = _operand_names(tuple_)
    if index >= len(names):
        return None
    return _value(names[index], by_name) if resolve else by_name.get(names[index])


def _binary(i: Instruction | None, opcode: str, by_computation: dict, by_name: dict):
    """((left value, right value), compare direction) of a binary `opcode` instruction, or of a fusion
    whose computation is one (operands mapped through its parameters), else None."""
    if i is None:
        return None
    operands = _operand_names(i)
    if i.opcode == "fusion":
        fused = by_computation.get(next(iter(_called(i)), ""), [])
        inner = [f for f in fused if f.opcode == opcode]
        if len(inner) != 1:
            return None
        parameters = {
            f.name: int(re.match(r"(\d+)\)", f.operands).group(1)) for f in fused if f.opcode == "parameter"
        }
        inner_operands = _operand_names(inner[0])
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
    return ProgramFacts(instructions, pairs, sync, depth, kernels, repeats)


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


def describe(instruction: Instruction, repeats: int, name_chars: int | None = None) -> str:
    """`all-gather bf16[4096,14336] x32 (op name)`: a collective, its array, how often it runs, where
    it comes from (the last `name_chars` characters of its op name)."""
    op_name = instruction.op_name[-name_chars:] if name_chars else instruction.op_name
    array = _ARRAY.search(instruction.shape).group(0)
    return f"{instruction.opcode} {array} x{repeats} ({op_name or instruction.name})"
