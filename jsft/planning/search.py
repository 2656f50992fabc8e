"""A setting that fits: remat policy x gradient accumulation x fsdp/context/tensor split, cheapest first.

Each candidate's train step is compiled (`compiled.compile_step`) and its peak memory compared with the
device's; the cost that ranks them is a model of relative step time, not a measurement.
"""

from __future__ import annotations

import dataclasses

from jsft.planning.compiled import Memory, build_trainer, compile_step
from jsft.planning.steps import DataPlan, step_rows
from jsft.units import GIB

# Per-tensor policies the search also tries (`config.REMAT_NAMES`): what they save of a layer.
SAVE_PROJECTIONS = "custom:save=q_proj,k_proj,v_proj,gate_proj,up_proj"  # all but o_proj, down_proj
SAVE_MLP_INPUTS = "custom:save=gate_proj,up_proj"
# Cheapest first: how much of the forward pass each policy recomputes in the backward pass.
REMAT_ORDER = ("none", "dots_saveable", SAVE_PROJECTIONS, SAVE_MLP_INPUTS, "minimal", "full")
# Relative step time of a setting, for ranking the ones that fit (a model, not a measurement): a
# training step is about 3 forward passes; remat adds the recomputed share of one more (full: all of
# it, minimal: norms, RoPE and attention, dots_saveable: the elementwise work between the matmuls);
# each further micro-batch gathers the parameters again and runs smaller, less efficient matmuls;
# each further tensor split all-reduces every layer's activations; each further context split gathers
# every layer's keys and values (GQA: a quarter of the queries' size or less) and scores its queries
# against the whole row without causal skipping on the xla backend; each further expert split moves
# every token of a mixture-of-experts layer to the other devices of the axis and back.
# The custom policies' costs scale dots_saveable's by their programs' matmul FLOPs (Tulu 8B on v5p-64,
# `tools/bench/remat_frontier.py`: 7.377e14, 7.553e14 and 7.817e14 a device; full 9.049e14).
REMAT_COST = {
    "none": 1.0,
    "dots_saveable": 1.05,
    SAVE_PROJECTIONS: 1.08,
    SAVE_MLP_INPUTS: 1.12,
    "minimal": 1.15,
    "full": 1.33,
}
MICRO_BATCH_COST, TENSOR_COST, CONTEXT_COST, EXPERT_COST = 0.04, 0.08, 0.03, 0.03


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the search varies; the mesh is data=1 x fsdp x expert x context x tensor."""

    remat: str
    grad_accum_steps: int
    fsdp: int
    tensor: int
    context: int = 1
    expert: int = 1

    def overrides(self) -> list[str]:
        return [
            f"--config.model.remat={self.remat}",
            f"--config.train.grad_accum_steps={self.grad_accum_steps}",
            "--config.mesh.data=1",
            f"--config.mesh.fsdp={self.fsdp}",
            f"--config.mesh.expert={self.expert}",
            f"--config.mesh.context={self.context}",
            f"--config.mesh.tensor={self.tensor}",
        ]

    @property
    def cost(self) -> float:
        """Relative step time (see REMAT_COST): the search picks the cheapest setting that fits."""
        return (
            REMAT_COST[self.remat]
            * (1 + MICRO_BATCH_COST * (self.grad_accum_steps - 1))
            * (1 + TENSOR_COST * (self.tensor - 1))
            * (1 + CONTEXT_COST * (self.context - 1))
            * (1 + EXPERT_COST * (self.expert - 1))
        )

    def apply(self, cfg):
        cfg = cfg.copy_and_resolve_references()
        cfg.model.remat, cfg.train.grad_accum_steps = self.remat, self.grad_accum_steps
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, self.fsdp, self.tensor
        cfg.mesh.context, cfg.mesh.expert = self.context, self.expert
        return cfg


def candidates(cfg, hf_config: dict, devices: int) -> list[Setting]:
    """Every setting the batch, the heads and the row length allow, cheapest first: less recomputation
    (remat), then fewer micro-batches (each gathers the parameters again), then less tensor and context
    parallelism. The mesh is data=1 x fsdp x expert x context x tensor: all devices shard the state; a
    mixture of experts may split its experts over `expert` devices (which also split rows). Context
    splits a row's tokens, so it is what lets fewer rows than devices (long rows) split at all; a split
    needs rows that divide into 2 x context chunks of whole 128-token blocks (splash's lane width).
    With `batch_unit="examples"` the batch counts conversations and a micro-batch still needs one per
    device: more micro-batches only add rows of padding (rows are a multiple of shards x micro-batches)."""
    rows, seq = cfg.train.global_batch_size, cfg.data.max_seq_length
    experts = hf_config.get("num_experts") or hf_config.get("num_local_experts") or 1
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    tensors = [t for t in (1, 2, 4, 8) if devices % t == 0 and heads % t == 0 and kv_heads % t == 0]
    contexts = [c for c in (1, 2, 4, 8, 16, 32) if devices % c == 0 and (c == 1 or seq % (2 * c * 128) == 0)]
    splits = [e for e in (1, 2, 4, 8, 16, 32, 64) if experts % e == 0 and devices % e == 0]
    accums = [a for a in range(1, rows + 1) if rows % a == 0]
    return [
        Setting(remat, accum, devices // (tensor * context * expert), tensor, context, expert)
        for remat in REMAT_ORDER
        for accum in accums
        for tensor in tensors
        for context in contexts
        for expert in splits
        if devices % (tensor * context * expert) == 0
        and (rows // accum) % (devices // (tensor * context)) == 0  # rows split over fsdp x expert
    ]


def search(
    cfg, hf_config: dict, devices: list, budget: float, steps: DataPlan | None = None, log=print
) -> tuple[Setting | None, dict]:
    """The cheapest setting (`Setting.cost`) whose compiled step fits `budget` bytes per device, and every
    compile's Memory.

    Memory falls as accumulation grows (smaller micro-batches), so for each (remat, tensor, context,
    expert) group the largest accumulation is compiled first: if even that does not fit, the group is
    skipped; otherwise a bisection finds its smallest accumulation that fits. Groups are tried by their
    best possible cost, and the search stops once no remaining group can beat the best fit found.
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
        groups.setdefault((setting.remat, setting.tensor, setting.context, setting.expert), []).append(
            setting
        )
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
