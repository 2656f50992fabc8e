"""What a good TPU train step does not contain: rules read from its program facts (`hlo.program_facts`).

A parameter collective is told from an activation one by its shape: the dims of the layout's parameters
(whole, or one layer's slice of the stacked ones), split over the mesh or replicated.
"""

from __future__ import annotations

from jsft.planning.hlo import ProgramFacts, describe


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
            describe(i, r) for i, r in parameter_sync if i.dims in kinds["layers"]
        ],
        "synchronous FSDP collectives outside the layers": [
            describe(i, r)
            for i, r in parameter_sync
            if i.dims in kinds["other"] and i.dims not in kinds["layers"]
        ],
        "async pairs without compute between": [
            describe(p.start, p.repeats) for p in facts.async_pairs if p.compute_between == 0
        ],
        "unexpected all-to-all": [
            describe(i, r)
            for i, r in facts.sync_collectives + [(p.start, p.repeats) for p in facts.async_pairs]
            if i.opcode.startswith("all-to-all") and not i.op_name.endswith(("/gather", "/scatter-add"))
        ],
        "whole stacked parameters gathered": [i.name for i in gathers if i.dims in kinds["stacked"]],
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
        if i.opcode == "all-reduce" and i.dims in kinds["replicated"] and i.dims not in split
    ]


def async_summary(facts: ProgramFacts) -> dict[str, int]:
    """Async pairs by collective, e.g. {'collective-permute': 105}, and how many have compute between."""
    out: dict[str, int] = {}
    for pair in facts.async_pairs:
        out[pair.collective] = out.get(pair.collective, 0) + 1
        key = f"{pair.collective} overlapped"
        out[key] = out.get(key, 0) + (pair.compute_between > 0)
    return out
