"""Where a compiled step's time goes on CPU, by XLA op: XLA:CPU's profiler records one event per executed
op (thunk), named after its HLO instruction; `op_class` sorts each op by the optimized program's text, and
`wall_shares` splits each moment of the step evenly between the ops running then (they run
concurrently on the thread pool), so the shares add up to the step's busy time. `tools/bench/
profile_step.py` is the command line.
"""

from __future__ import annotations

import collections
import re

CONTAINERS = {"while", "conditional", "call"}  # ops whose events enclose other ops' events
OP_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")


def parse_hlo(text: str):
    """({op: (opcode, called computation, stack frame id)}, {computation: [opcodes]}, stack(frame id))."""
    files, functions, locations, frames = {}, {}, {}, {}
    ops, computations = {}, collections.defaultdict(list)
    section, computation = None, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and line[:1].isdigit():
            index, rest = line.split(" ", 1)
            fields = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
            if section == "FileNames":
                files[int(index)] = rest.strip('"')
            elif section == "FunctionNames":
                functions[int(index)] = rest.strip('"')
            elif section == "FileLocations":
                locations[int(index)] = (
                    files[fields["file_name_id"]],
                    functions[fields["function_name_id"]],
                    fields["line"],
                )
            else:
                frames[int(index)] = (fields["file_location_id"], fields["parent_frame_id"])
            continue
        if line.startswith(("%", "ENTRY")):
            section = None
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        match = OP_LINE.match(line)
        if match:
            name, _, opcode, rest = match.groups()
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            ops[name] = (opcode, calls and calls.group(1), frame and int(frame.group(1)))
            computations[computation].append(opcode)

    def stack(frame_id: int | None) -> list[tuple[str, str, int]]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location, frame_id = frames[frame_id]
            out.append(locations[location])
        return out

    return ops, computations, stack


def op_class(name: str, ops: dict, computations: dict) -> str:
    opcode, calls, _ = ops.get(name, ("?", None, None))
    inner = set(computations.get(calls, [])) if calls else set()
    if opcode in ("dot", "convolution") or inner & {"dot", "convolution"}:
        return "matmul"
    if opcode in ("copy", "transpose") or (
        opcode == "fusion" and inner <= {"copy", "transpose", "bitcast", "parameter"}
    ):
        return "copy/transpose"
    for kind in ("dynamic-update-slice", "dynamic-slice"):
        if opcode == kind or kind in inner:
            return kind
    if name.startswith("wrapped_broadcast") or opcode == "broadcast":
        return "broadcast"
    if "exponential" in inner:
        return "exp"
    if opcode == "reduce" or "reduce" in inner:
        return "reduce"
    return "other elementwise" if opcode == "fusion" else opcode


def wall_shares(events: list[tuple[str, int, int]]) -> tuple[collections.Counter, int]:
    """({op: ns}, busy ns): every instant split evenly between the ops running then."""
    points = sorted(
        [(s, 1, i) for i, (_, s, _) in enumerate(events)] + [(e, -1, i) for i, (_, _, e) in enumerate(events)]
    )
    shares, active, last, busy = collections.Counter(), set(), None, 0
    for moment, kind, i in points:
        if active:
            busy += moment - last
            for j in active:
                shares[events[j][0]] += (moment - last) / len(active)
        last = moment
        (active.add if kind == 1 else active.discard)(i)
    return shares, busy
