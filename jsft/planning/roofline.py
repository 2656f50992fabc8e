"""A bound on a TPU train step's time and MFU from published peaks (`hardware.Chip`), not a measurement.

Each op of the compiled program (a fusion, a matmul, a copy, an attention kernel; `costs.op_costs`)
takes at least its matmul FLOPs at the chip's bf16 peak and at least its HBM bytes at the HBM bandwidth,
whichever is longer; the ops run one after another, each as many times as its loops run. Collective
time = bytes each device moves (result sizes and loop trip counts read from the program, ring factors)
/ ICI bandwidth. MFU counts the model's FLOPs (`flops.mfu_flops_per_token`) against that step.
"""

from __future__ import annotations

from jsft import flops, hardware
from jsft.planning.costs import op_costs
from jsft.planning.hlo import ProgramFacts


def wire_bytes(facts: ProgramFacts, devices: int) -> tuple[float, float]:
    """(bytes each device sends through async collectives, through blocking ones) per step.

    A ring all-gather or all-to-all of a result of S bytes moves S (n-1)/n per device, an all-reduce
    twice that, a collective-permute S; result sizes and loop trip counts come from the program. An
    async pair with no compute scheduled inside it blocks like a synchronous collective."""
    share = (devices - 1) / devices
    factor = {"all-gather": share, "all-to-all": share, "reduce-scatter": share, "all-reduce": 2 * share}

    def moved(opcode: str, size: int, repeats: int) -> float:
        return factor.get(opcode, 1.0) * size * repeats

    overlapped = sum(moved(p.collective, p.bytes, p.repeats) for p in facts.async_pairs if p.compute_between)
    blocking = sum(moved(i.opcode, i.bytes, r) for i, r in facts.sync_collectives) + sum(
        moved(p.collective, p.bytes, p.repeats) for p in facts.async_pairs if not p.compute_between
    )
    return overlapped, blocking


def roofline(facts: ProgramFacts, trainer, topology: str) -> dict[str, float]:
    """Expected step time and MFU: the program's ops (each bound by its matmuls or its HBM bytes) overlap
    the async collectives; synchronous collectives add to it. `compute_s` is the model's FLOPs at peak
    (the MFU definition, `flops.MFU_DEFINITION`, the training log's), the floor of the step, so MFU =
    compute time / step time <= 1; `ops_s` is the program's own work, recomputation and memory-bound
    ops included, of which `hbm_bound_s` is the time ops wait on HBM beyond their matmuls."""
    chip = hardware.topology(topology).chip
    peak, hbm, ici = chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth
    devices = trainer.mesh.size
    seq = trainer.cfg.data.max_seq_length
    tokens = trainer.cfg.train.global_batch_size * seq
    model_flops = flops.mfu_flops_per_token(trainer.layout.cfg, seq) * tokens / devices
    compute = model_flops / peak
    ops = op_costs(facts)
    ops_s = sum(max(op.flops / peak, op.hbm_bytes / hbm) * op.repeats for op in ops)
    hbm_bound = sum(max(op.hbm_bytes / hbm - op.flops / peak, 0.0) * op.repeats for op in ops)
    hbm_bytes = sum(op.hbm_bytes * op.repeats for op in ops)
    overlapped, blocking = wire_bytes(facts, devices)
    step = max(compute, ops_s, overlapped / ici) + blocking / ici
    return {
        "compute_s": compute,
        "ops_s": ops_s,
        "hbm_bound_s": hbm_bound,
        "hbm_s": hbm_bytes / hbm,
        "async_collectives_s": overlapped / ici,
        "sync_collectives_s": blocking / ici,
        "step_s": step,
        "mfu": model_flops / (step * peak),
        "hbm_bytes": hbm_bytes,
        "async_bytes": overlapped,
        "sync_bytes": blocking,
    }
