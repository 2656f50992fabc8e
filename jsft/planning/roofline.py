"""A bound on a TPU train step's time and MFU from published peaks (`hardware.Chip`), not a measurement.

Compute time = model FLOPs per device / the chip's bf16 peak; HBM time = the weights streamed per
micro-batch and the optimizer state / HBM bandwidth; collective time = bytes each device moves (result
sizes and loop trip counts read from the program, ring factors) / ICI bandwidth.
"""

from __future__ import annotations

import jax.numpy as jnp

from jsft import flops, hardware, optim
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
    """Expected step time and MFU: compute and HBM time overlap the async collectives; synchronous
    collectives add to it. Compute time and MFU count the same model FLOPs, `flops.mfu_flops_per_token`
    (causal attention; `flops.MFU_DEFINITION`, the training log's MFU), so MFU = compute time / step
    time <= 1."""
    chip = hardware.topology(topology).chip
    peak, hbm, ici = chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth
    devices = trainer.mesh.size
    seq = trainer.cfg.data.max_seq_length
    tokens = trainer.cfg.train.global_batch_size * seq
    model = trainer.layout.cfg
    model_flops = flops.mfu_flops_per_token(model, seq) * tokens / devices
    compute = model_flops / peak
    # HBM floor: the gathered bf16 weights read in the forward, the backward and the recomputation
    # of each micro-batch, and the state (parameters, gradients, the optimizer's moments) read and written.
    params = model.num_params()
    param_bytes = jnp.dtype(trainer.cfg.model.param_dtype).itemsize
    state_bytes = 2 * param_bytes + optim.moment_bytes_per_parameter(trainer.cfg.optim, param_bytes)
    streamed = 3 * 2 * params * trainer.cfg.train.grad_accum_steps + 2 * state_bytes * params / devices
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
