"""Orbax checkpoints: one numbered folder per step under `<output_dir>/checkpoints`.

Each step holds the parameters and optimizer state (as separate items, so export reads parameters
alone), the Grain iterator state of every process, the run config, and the Hugging Face assets
(config.json, tokenizer files, the chat template used) that make the step exportable on its own.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iter, meta: dict, hf_assets: dict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
            hf=ocp.args.JsonSave(hf_assets),
        ),
        force=True,
    )


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, shardings: dict, data_iter) -> dict:
    """Restores the train state (onto `shardings`) and, in place, the data iterator."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_state["params"], shardings["params"])),
            opt_state=ocp.args.StandardRestore(
                _abstract(abstract_state["opt_state"], shardings["opt_state"])
            ),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ),
    )
    step_value = jax.device_put(
        jax.numpy.asarray(restored["meta"]["step"], jax.numpy.int32), shardings["step"]
    )
    return {"params": restored["params"], "opt_state": restored["opt_state"], "step": step_value}


def restore_for_export(mngr: ocp.CheckpointManager, step: int, abstract_params: dict, shardings: dict):
    """(params, meta, hf assets) of one step, without the optimizer state or data iterator."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_params, shardings)),
            meta=ocp.args.JsonRestore(),
            hf=ocp.args.JsonRestore(),
        ),
    )
    return restored["params"], restored["meta"], restored["hf"]


def read_json_item(mngr: ocp.CheckpointManager, step: int, item: str) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
