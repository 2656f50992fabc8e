"""Hugging Face tensor names <-> jsft parameter names, as data.

One table per family: (HF name, jsft name, transform). `{i}` stands for the layer index, `{e}` for an
expert's: each expert is its own HF tensor, and jsft stacks them on a leading axis. The same table drives
import and export, so the two directions cannot drift apart. Transforms are exact reshapes and
transposes, so a round trip is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Transform(NamedTuple):
    """An exact layout change. `to_jsft` returns a view where it can, so loading can slice a memory-mapped
    tensor shard by shard without reading it whole; `hf_shape` checks a file's tensor before that."""

    to_jsft: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (hf tensor, jsft shape) -> jsft tensor
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # jsft shape -> HF shape


KEEP = Transform(lambda x, shape: x, lambda x: x, lambda shape: shape)
TRANSPOSE = Transform(lambda x, shape: x.T, lambda x: x.T, lambda shape: shape[::-1])
# HF [heads * head_dim, hidden] <-> jsft [hidden, heads, head_dim]
HEADS_IN = Transform(
    lambda x, shape: x.reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1),
    lambda x: x.reshape(x.shape[0], -1).T,
    lambda shape: (shape[1] * shape[2], shape[0]),
)
# HF [hidden, heads * head_dim] <-> jsft [heads, head_dim, hidden]
HEADS_OUT = Transform(
    lambda x, shape: x.reshape(shape[2], shape[0], shape[1]).transpose(1, 2, 0),
    lambda x: x.reshape(-1, x.shape[-1]).T,
    lambda shape: (shape[2], shape[0] * shape[1]),
)
# HF [heads * head_dim] <-> jsft [heads, head_dim]
HEADS_FLAT = Transform(
    lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1), lambda shape: (shape[0] * shape[1],)
)

_LAYER = "model.layers.{i}."
# Tensors every family has, under the same names.
_SHARED = (
    ("model.embed_tokens.weight", "embed", KEEP),
    ("model.norm.weight", "final_norm.scale", KEEP),
    ("lm_head.weight", "lm_head", TRANSPOSE),
    (_LAYER + "self_attn.q_proj.weight", "layers.{i}.attn.q_proj", HEADS_IN),
    (_LAYER + "self_attn.k_proj.weight", "layers.{i}.attn.k_proj", HEADS_IN),
    (_LAYER + "self_attn.v_proj.weight", "layers.{i}.attn.v_proj", HEADS_IN),
    (_LAYER + "self_attn.o_proj.weight", "layers.{i}.attn.o_proj", HEADS_OUT),
    (_LAYER + "self_attn.q_proj.bias", "layers.{i}.attn.q_bias", HEADS_FLAT),
    (_LAYER + "self_attn.k_proj.bias", "layers.{i}.attn.k_bias", HEADS_FLAT),
    (_LAYER + "self_attn.v_proj.bias", "layers.{i}.attn.v_bias", HEADS_FLAT),
    (_LAYER + "self_attn.o_proj.bias", "layers.{i}.attn.o_bias", KEEP),
    (_LAYER + "mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj", TRANSPOSE),
    (_LAYER + "mlp.up_proj.weight", "layers.{i}.mlp.up_proj", TRANSPOSE),
    (_LAYER + "mlp.down_proj.weight", "layers.{i}.mlp.down_proj", TRANSPOSE),
)
# HF's `post_attention_layernorm` is the norm before the MLP in Llama, but after attention in Gemma.
_PRE_NORMS = (
    (_LAYER + "input_layernorm.weight", "layers.{i}.pre_attn_norm.scale", KEEP),
    (_LAYER + "post_attention_layernorm.weight", "layers.{i}.pre_mlp_norm.scale", KEEP),
)
_POST_NORMS = (
    (_LAYER + "post_attention_layernorm.weight", "layers.{i}.post_attn_norm.scale", KEEP),
    (_LAYER + "post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.scale", KEEP),
)
_SANDWICH_NORMS = (
    (_LAYER + "input_layernorm.weight", "layers.{i}.pre_attn_norm.scale", KEEP),
    (_LAYER + "pre_feedforward_layernorm.weight", "layers.{i}.pre_mlp_norm.scale", KEEP),
    *_POST_NORMS,
)


def _qk_norms(transform: Transform) -> tuple:
    return (
        (_LAYER + "self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale", transform),
        (_LAYER + "self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale", transform),
    )


def _experts(block: str, gate: str, up: str, down: str) -> tuple:
    """A mixture's router and its experts' kernels, as the Hub's files name them (per expert)."""
    experts = _LAYER + block + ".experts.{e}."
    return (
        (_LAYER + block + ".gate.weight", "layers.{i}.mlp.router", TRANSPOSE),
        (experts + gate + ".weight", "layers.{i}.mlp.gate_proj", TRANSPOSE),
        (experts + up + ".weight", "layers.{i}.mlp.up_proj", TRANSPOSE),
        (experts + down + ".weight", "layers.{i}.mlp.down_proj", TRANSPOSE),
    )


_ATTENTION = tuple(entry for entry in _SHARED if ".mlp." not in entry[0])
LLAMA = _SHARED + _PRE_NORMS
QWEN3 = LLAMA + _qk_norms(KEEP)  # per head: [head_dim]
OLMO2 = _SHARED + _POST_NORMS + _qk_norms(HEADS_FLAT)  # over the projection: [heads * head_dim]
GEMMA2 = _SHARED + _SANDWICH_NORMS
GEMMA3 = GEMMA2 + _qk_norms(KEEP)
QWEN3_MOE = _ATTENTION + _PRE_NORMS + _qk_norms(KEEP) + _experts("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL = _ATTENTION + _PRE_NORMS + _experts("block_sparse_moe", "w1", "w3", "w2")
OLMOE = _ATTENTION + _PRE_NORMS + _qk_norms(HEADS_FLAT) + _experts("mlp", "gate_proj", "up_proj", "down_proj")

NAME_MAPS = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": QWEN3,
    "olmo2": OLMO2,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "qwen3_moe": QWEN3_MOE,
    "mixtral": MIXTRAL,
    "olmoe": OLMOE,
}

# HF buffers that are recomputed, not loaded.
IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile("^" + escaped.replace(re.escape("{e}"), r"(?P<e>\d+)") + "$")


class NameMap:
    """Translates names both ways with one table.

    With `stacked` (scanned layers), every layer's tensor maps to one jsft parameter "layers.<rest>"
    with a leading layer axis. Experts' tensors map to one jsft parameter per layer with an expert axis
    (after the layer axis, when stacked). A tensor's position on these leading axes, its `index`, travels
    beside the jsft name: (layer, expert), (layer,), (expert,) or ().
    """

    def __init__(self, model_type: str, stacked: bool = False):
        table = [
            (hf, jsft.replace("layers.{i}.", "layers.") if stacked else jsft, t)
            for hf, jsft, t in NAME_MAPS[model_type]
        ]
        self.stacked = stacked
        self._to_jsft = [(_pattern(hf), jsft, t) for hf, jsft, t in table]
        self._to_hf = [(_pattern(jsft), hf, t) for hf, jsft, t in table]

    def to_jsft(self, hf_name: str) -> tuple[str, Transform, tuple[int, ...]] | None:
        """(jsft name, transform, index), or None for an unknown name."""
        for pattern, target, transform in self._to_jsft:
            m = pattern.match(hf_name)
            if m:
                groups = m.groupdict()
                layer = (int(groups["i"]),) if self.stacked and "i" in groups else ()
                expert = (int(groups["e"]),) if "e" in groups else ()
                return target.format(i=groups.get("i")), transform, layer + expert
        return None

    def to_hf(
        self, jsft_name: str, layer: int | None = None, expert: int | None = None
    ) -> tuple[str, Transform]:
        """The HF name of a parameter (of its `layer`, for a stacked one; of its `expert`, for experts')
        and the transform to HF."""
        for pattern, target, transform in self._to_hf:
            m = pattern.match(jsft_name)
            if m:
                if "{e}" in target and expert is None:
                    raise KeyError(f"{jsft_name!r} holds experts: name one")
                i = m.groupdict().get("i") if layer is None else layer
                return target.format(i=i, e=expert), transform
        raise KeyError(f"no Hugging Face name for jsft parameter {jsft_name!r}")

    def to_hf_at(self, jsft_name: str, index: tuple[int, ...]) -> tuple[str, Transform]:
        """`to_hf` of the tensor at `index` (see the class) of a parameter."""
        layer = index[0] if self.is_stacked(jsft_name) else None
        expert = index[-1] if self.has_experts(jsft_name) else None
        return self.to_hf(jsft_name, layer, expert)

    def is_stacked(self, jsft_name: str) -> bool:
        return self.stacked and jsft_name.startswith("layers.")

    def has_experts(self, jsft_name: str) -> bool:
        return any(pattern.match(jsft_name) and "{e}" in hf for pattern, hf, _ in self._to_hf)

    def index_axes(self, jsft_name: str) -> int:
        """How many leading axes of the parameter index HF tensors (layers when stacked, experts)."""
        return int(self.is_stacked(jsft_name)) + int(self.has_experts(jsft_name))
