"""What each op of a compiled program costs: its matmul FLOPs and the bytes it moves through HBM.

Read from the program's text (`hlo.program_facts`), each op counted as many times as its loops run:
XLA's own `cost_analysis()` counts a loop body once. The roofline (`roofline.py`) bounds each op by the
longer of its FLOPs at the chip's peak and its bytes at the HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from jsft.planning.hlo import (
    ARRAY,
    BOOKKEEPING,
    COLLECTIVES,
    Instruction,
    ProgramFacts,
    called,
    operand_names,
)

# Top-level ops that move no HBM bytes of their own: bookkeeping, control flow (their bodies are counted),
# collectives (ICI traffic, `wire_bytes`) and the ends of async ops whose start is counted.
NO_HBM_WORK = BOOKKEEPING - {"copy-start"} | {
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
class OpCost:
    """One op the chip runs (a fusion, an unfused matmul, a copy, a kernel), per execution."""

    instruction: Instruction
    flops: float  # matmul FLOPs (dots and convolutions; a splash kernel's by its shapes)
    hbm_bytes: float  # bytes it reads from and writes to HBM
    repeats: int  # executions per step


def op_costs(facts: ProgramFacts) -> list[OpCost]:
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
            inner.update(called(i))
        elif i.opcode not in ("while", "conditional", "call"):
            inner.update(re.findall(r"to_apply=(%[\w.\-]+)", i.operands))
    costs = []
    for i in instructions:
        if i.computation in inner or i.opcode in NO_HBM_WORK or i.opcode.endswith(("-done", "-update")):
            continue
        if i.opcode.endswith("-start") and i.opcode != "copy-start" or i.opcode == "async-start":
            continue  # collectives and other async work: ICI or their own wrapped op
        if i.opcode == "copy-start":  # (destination, source, context): the HBM sides of one DMA
            moved = i.hbm_bytes
        elif i.opcode == "fusion":
            moved = _fusion_hbm_bytes(i, by_computation, by_name)
        else:
            moved = i.hbm_bytes + sum(by_name[n].hbm_bytes for n in operand_names(i) if n in by_name)
        flops = 0.0
        if i.opcode in ("dot", "convolution"):
            flops = _matmul_flops(i, by_name)
        elif i.opcode == "fusion":
            flops = sum(
                _matmul_flops(f, by_name)
                for c in called(i)
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
    body = by_computation.get(next(iter(called(fusion)), ""), [])
    parameters = _parameters(body)
    root = body[-1] if body else None
    roots = [_in_body(body, n) for n in operand_names(root)] if root and root.opcode == "tuple" else [root]
    roots = [_in_body(body, _through_bitcasts(r.name, body)) for r in roots if r is not None]
    in_place = [r for r in roots if r is not None and r.opcode == "dynamic-update-slice"]
    buffers = {_through_bitcasts(operand_names(r)[0], body) for r in in_place}

    def read(index: int, operand: Instruction) -> float:
        name = parameters.get(index)
        if name is None or operand.hbm_bytes == 0:
            return operand.hbm_bytes
        if name in buffers:
            return 0.0
        sliced = _sliced_bytes(name, body, by_computation)
        return operand.hbm_bytes if sliced is None else min(operand.hbm_bytes, sliced)

    operands = [by_name.get(n) for n in operand_names(fusion)]
    reads = sum(read(k, o) for k, o in enumerate(operands) if o is not None)
    written = fusion.hbm_bytes
    if in_place:  # the fusion's result is the updated buffer: only the updates are written
        updates = sum(_in_body(body, operand_names(r)[1]).hbm_bytes for r in in_place)
        whole = sum(r.hbm_bytes for r in in_place)
        written = max(written - whole, 0) + (updates if fusion.hbm_bytes else 0)
    return reads + written


def _in_body(body: list[Instruction], name: str) -> Instruction | None:
    """The instruction of a fused computation named `name`."""
    return next((f for f in body if f.name == name), None)


def _through_bitcasts(name: str, body: list[Instruction]) -> str:
    """The parameter (or other instruction) behind bitcasts of `name` inside a fused computation."""
    i = _in_body(body, name)
    while i is not None and i.opcode == "bitcast":
        name = operand_names(i)[0]
        i = _in_body(body, name)
    return name


def _parameters(body: list[Instruction]) -> dict[int, str]:
    """A computation's parameters by number."""
    return {int(re.match(r"(\d+)\)", f.operands).group(1)): f.name for f in body if f.opcode == "parameter"}


# Ops a slice may read through and still read only its slice (a collective-matmul window pads the
# activation, then slices the window out of it).
_SLICE_THROUGH = ("bitcast", "pad", "convert", "copy")


def _sliced_bytes(name: str, body: list[Instruction], by_computation: dict) -> int | None:
    """Bytes the slices of `name` read inside a fused computation, looking through bitcasts, pads and
    conversions and into nested fusions; None unless every reader ends in a slice, dynamic slice or
    gather of it."""
    readers = [u for u in body if name in operand_names(u)]
    if not readers:
        return None
    total = 0
    for u in readers:
        if u.opcode in ("dynamic-slice", "slice", "gather") and operand_names(u)[0] == name:
            total += u.hbm_bytes
            continue
        if u.opcode in _SLICE_THROUGH:
            inner = _sliced_bytes(u.name, body, by_computation)
        elif u.opcode == "fusion":
            nested = by_computation.get(next(iter(called(u)), ""), [])
            parameters = _parameters(nested)
            slices = [
                _sliced_bytes(parameters[k], nested, by_computation) if k in parameters else None
                for k, n in enumerate(operand_names(u))
                if n == name
            ]
            inner = None if None in slices else sum(slices)
        else:
            inner = None
        if inner is None:
            return None
        total += inner
    return total


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
        for n in operand_names(kernel)
        if n in by_name and re.match(r"\(?(bf16|f16|f32)\[\d+,\d+,\d+", by_name[n].shape)
    ]  # the block masks before q, k and v are integers
    if part is None or len(tensors) < 2:
        return 0.0
    q, k = tensors[:2]
    return 2.0 * _SPLASH_MATMULS[part] * math.prod(q[:-1]) * k[-2] * q[-1] / 2


def _full_dims(instruction: Instruction | None) -> tuple[int, ...]:
    """All dimensions of an instruction's result (of the first array of a tuple), size-1 axes kept."""
    found = ARRAY.search(instruction.shape) if instruction else None
    if found is None:
        raise ValueError(f"no array shape for {instruction.name if instruction else 'a missing operand'}")
    return tuple(int(d) for d in found.group(2).split(",") if d)


def _matmul_flops(i: Instruction, by_name: dict[str, Instruction]) -> float:
    """2 x the multiply-adds of one dot or convolution (XLA's HloCostAnalysis count)."""
    lhs, rhs = (_full_dims(by_name.get(n)) for n in operand_names(i)[:2])
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


def matmul_flops(facts: ProgramFacts) -> float:
    """FLOPs per step and device of the program's dots and convolutions (the TPU compiler writes its
    matmuls as convolutions), each times the trips of the loops around it. Both branches of a
    conditional count (as if each ran), and zeros a convolution's padding adds do not."""
    by_name = {i.name: i for i in facts.instructions}
    return sum(
        _matmul_flops(i, by_name) * facts.repeats.get(i.computation, 1)
        for i in facts.instructions
        if i.opcode in ("dot", "convolution")
    )
