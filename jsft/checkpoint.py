"""Orbax checkpoints: one numbered folder per step under `<output_dir>/checkpoints`.

Each step holds the parameters and optimizer state (separate items, so export reads parameters
alone), the Grain iterator state of every process, a JSON `meta` item (step, counters, the run
config) and the Hugging Face assets (config.json, tokenizer files, the chat template used) that make
the step exportable on its own. Orbax writes each step into a temporary folder and renames it when
complete, so a save killed midway never looks like a checkpoint. A complete-looking step that
fails to restore (a truncated file) is moved aside, never deleted, and the previous step is used.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jsft import models
from jsft.errors import JsftError

log = logging.getLogger(__name__)


def manager(directory: str, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True
    )
    local = "://" not in directory  # gs:// and other tensorstore URLs pass through unchanged
    return ocp.CheckpointManager(os.path.abspath(directory) if local else directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iter, meta: dict, hf_assets: dict) -> None:
    """Starts an asynchronous save; arrays are copied off the devices before this returns."""
    meta = dict(meta, step=step, nonfinite_streak=int(jax.device_get(state["nonfinite_streak"])))
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
    """The train state of `step` on `shardings` (any mesh: Orbax reshards); restores `data_iter` too."""
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
    meta = restored["meta"]

    def scalar(value, sharding):
        return jax.device_put(jnp.asarray(value, jnp.int32), sharding)

    return {
        "params": restored["params"],
        "opt_state": restored["opt_state"],
        "step": scalar(meta["step"], shardings["step"]),
        "nonfinite_streak": scalar(meta.get("nonfinite_streak", 0), shardings["nonfinite_streak"]),
    }


def restore_latest_good(
    mngr: ocp.CheckpointManager, abstract_state: dict, shardings: dict, data_iter, step: int | None = None
) -> tuple[int | None, dict | None]:
    """(step, state) of `step`, or of the newest step that restores; corrupt newer steps are moved aside."""
    if step is not None:
        if step not in mngr.all_steps():
            raise JsftError(
                f"checkpoint step {step} is not in {mngr.directory}; kept: {sorted(mngr.all_steps())}"
            )
        return step, restore(mngr, step, abstract_state, shardings, data_iter)
    for candidate in sorted(mngr.all_steps(), reverse=True):
        try:
            return candidate, restore(mngr, candidate, abstract_state, shardings, data_iter)
        except Exception as e:  # Orbax and tensorstore raise many types for damaged files
            aside = quarantine(mngr, candidate)
            log.warning(
                "checkpoint step %d cannot be restored (%s); moved it to %s", candidate, _first_line(e), aside
            )
    return None, None


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
    """Renames a damaged step folder out of the manager's sight (kept for inspection, not deleted)."""
    source = os.path.join(str(mngr.directory), str(step))
    target = os.path.join(str(mngr.directory), f"corrupt-{step}-{int(time.time())}")
    if jax.process_index() == 0:
        os.rename(source, target)
    multihost_utils.sync_global_devices(f"jsft-quarantine-{step}")
    mngr.reload()
    return target


def read_json_item(mngr: ocp.CheckpointManager, step: int, item: str) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def hf_files(mngr: ocp.CheckpointManager, step: int) -> dict[str, bytes]:
    """The Hugging Face assets saved with a step: config.json, tokenizer files, the chat template."""
    return {name: base64.b64decode(text) for name, text in read_json_item(mngr, step, "hf")["files"].items()}


def saved_layout(mngr: ocp.CheckpointManager, step: int) -> tuple[models.Layout, dict]:
    """(the parameter layout a step was saved in, the run config): its config.json, parameter dtype
    and layer stacking, which decide the names and shapes its arrays restore into."""
    hf_config = json.loads(hf_files(mngr, step)["config.json"])
    run_cfg = read_json_item(mngr, step, "meta")["config"]
    cfg = models.ModelConfig.from_hf(
        hf_config,
        param_dtype=models.dtype_of(run_cfg["model"]["param_dtype"]),
        scan_layers=run_cfg["model"].get("scan_layers", False),  # steps saved before the key: unrolled
    )
    return models.Layout(cfg, hf_config["model_type"]), run_cfg


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
