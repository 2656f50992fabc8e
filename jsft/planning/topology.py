"""The report `python -m jsft.cli.tpu` prints for a TPU slice: the config's train step compiled by the
TPU compiler on this machine, its memory, async collective pairs, rule violations and roofline.
"""

from __future__ import annotations

import dataclasses
import os

from jsft import flops, hardware
from jsft.errors import TopologyError
from jsft.models import shapes
from jsft.planning.checks import async_summary, check_program, replicated_all_reduces, sharded_parameters
from jsft.planning.compiled import build_trainer, compile_step, topology_devices
from jsft.planning.costs import matmul_flops, op_costs
from jsft.planning.hlo import describe, program_facts
from jsft.planning.roofline import roofline
from jsft.units import GIB


def topology_report(cfg, topology: str) -> dict:
    """Compiles the config's train step for a TPU slice: memory, async pairs, rule violations, roofline."""
    hf_config, _ = shapes.hf_config(cfg.model.path, cfg.model.revision)
    trainer = build_trainer(cfg, hf_config, topology_devices(topology))
    compiled, memory, text = compile_step(trainer, with_text=True)
    if memory.refused:
        raise TopologyError(f"the train step does not fit {topology}: {memory.refused}")
    facts = program_facts(text)
    sharded = sharded_parameters(trainer)
    return {
        "topology": topology,
        "devices": trainer.mesh.size,
        "mesh": dict(trainer.mesh.shape),
        "memory_gib": {k: v / GIB for k, v in dataclasses.asdict(memory).items() if k != "refused"},
        "device_memory_gib": hardware.topology(topology).chip.hbm_bytes / GIB,
        "async_pairs": async_summary(facts),
        "sync_collectives": [describe(i, r, 60) for i, r in facts.sync_collectives],
        "collective_gib_per_step": {k: v / GIB for k, v in facts.collective_bytes().items()},
        "splash_kernels": facts.splash_kernels,
        "problems": check_program(facts, trainer.layout, sharded),
        "replicated_all_reduces": replicated_all_reduces(facts, trainer.layout, sharded),
        "roofline": roofline(facts, trainer, topology),
        # dots and convolutions times their loops' trips, the splash attention kernels (custom calls,
        # counted from their shapes), beside XLA's own count, which counts each loop body once
        "program_flops_per_device": {
            "matmuls": matmul_flops(facts),
            "attention_kernels": sum(
                op.flops * op.repeats for op in op_costs(facts) if op.instruction.opcode == "custom-call"
            ),
            "cost_analysis": float((compiled.cost_analysis() or {}).get("flops", 0.0)),
        },
        "mfu_definition": flops.MFU_DEFINITION,
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
    }


def remat_frontier(cfg, topology: str, policies: list[str]) -> list[dict]:
    """For each `model.remat` policy, the config's train step compiled for the slice: peak memory per
    device (None where the compiler refuses it), host bytes offloaded, and the program's matmul FLOPs
    per device (recomputation included) with their time at the chip's bf16 peak."""
    hf_config, _ = shapes.hf_config(cfg.model.path, cfg.model.revision)
    devices, chip = topology_devices(topology), hardware.topology(topology).chip
    rows = []
    for policy in policies:
        policy_cfg = cfg.copy_and_resolve_references()
        policy_cfg.model.remat = policy
        _, memory, text = compile_step(build_trainer(policy_cfg, hf_config, devices), with_text=True)
        flops = None if memory.refused else matmul_flops(program_facts(text))
        rows.append(
            {
                "remat": policy,
                "peak_gib": None if memory.refused else memory.peak / GIB,
                "host_gib": memory.host / GIB,
                "matmul_flops": flops,
                "matmul_s": None if flops is None else flops / chip.peak_flops,
                "refused": memory.refused,
            }
        )
    return rows
