"""What a decoder block keeps for its backward pass (`model.remat`): the named policies, per-tensor ones
(`custom:save=...;offload=...`), and the fallback where activations cannot go to host memory."""

from __future__ import annotations

import dataclasses
import logging

import jax

from jsft.config import CUSTOM_REMAT, parse_custom_remat
from jsft.models.config import ModelConfig

log = logging.getLogger(__name__)

# What a decoder block saves for the backward pass; everything else is recomputed from its input.
#   full: nothing (least memory, about one more forward pass of compute);
#   minimal: the projections' outputs (matmuls without batch dimensions; MaxText's "minimal"), so the
#     backward recomputes norms, RoPE, activations and the attention core (its [t, t] scores included);
#   dots_saveable: every matmul's output, attention scores included (most memory of the three);
#   offload: as full, but each block's input is moved to host memory after the forward pass and back for
#     the backward (MaxText's offload policy), so no layer input stays in device memory. TPU and GPU
#     only: `Layout` falls back to full elsewhere (`resolve_remat`).
#   custom:save=NAMES;offload=NAMES: the named activations (`config.REMAT_NAMES`: the layer input, each
#     projection's output, the attention core's output) saved or offloaded, the rest recomputed.
LAYER_INPUT = "layer_input"  # the name of each block's input, for the offload policy
ATTENTION_OUT = "attention_out"  # the attention core's output, before o_proj
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat_policy(remat: str):
    """The `jax.checkpoint` policy of a `model.remat` value other than none."""
    if remat in REMAT_POLICIES:
        return REMAT_POLICIES[remat]
    save, offload = parse_custom_remat(remat) or ((), (LAYER_INPUT,))  # offload: the layer input only
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(save),
        names_which_can_be_offloaded=list(offload),
        offload_src="device",
        offload_dst="pinned_host",
    )


OFFLOAD_PLATFORMS = ("tpu", "gpu")  # where jax can offload activations to host memory


def resolve_remat(cfg: ModelConfig, device: jax.Device | None = None) -> ModelConfig:
    """`cfg` without host offload (saying so) on a platform that cannot offload: `remat=offload` becomes
    `full`, and a custom policy recomputes what it would have offloaded."""
    device = device or jax.devices()[0]
    custom = parse_custom_remat(cfg.remat)
    if device.platform in OFFLOAD_PLATFORMS or not (cfg.remat == "offload" or (custom and custom[1])):
        return cfg
    remat = f"{CUSTOM_REMAT}save={','.join(custom[0])}" if custom else "full"
    log.warning(
        "model.remat=%s: %s devices cannot offload activations to host memory; using remat=%s",
        cfg.remat,
        device.platform,
        remat,
    )
    return dataclasses.replace(cfg, remat=remat)
