"""Hugging Face tensor names <-> jsft parameter names, as data.

One table per family: (HF name, jsft name, transform). `{i}` stands for the layer index. The same
table drives import and export, so the two directions cannot drift apart. Transforms are exact
reshapes and transposes, so a round trip is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Transform(NamedTuple):
    to_jsft: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (hf tensor, jsft shape) -> jsft tensor
    to_hf: Callable[[np.ndarray], np.ndarray]


KEEP = Transform(lambda x, shape: x.reshape(shape), lambda x: x)
TRANSPOSE = Transform(lambda x, shape: x.T, lambda x: x.T)
# HF [heads * head_dim, hidden] <-> jsft [hidden, heads, head_dim]
HEADS_IN = Transform(lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T)
# HF [hidden, heads * head_dim] <-> jsft [heads, head_dim, hidden]
HEADS_OUT = Transform(lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T)
# HF [heads * head_dim] <-> jsft [heads, head_dim]
HEADS_BIAS = Transform(lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1))

LLAMA = (
    ("model.embed_tokens.weight", "embed", KEEP),
    ("model.norm.weight", "final_norm.scale", KEEP),
    ("lm_head.weight", "lm_head", TRANSPOSE),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.scale", KEEP),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.scale", KEEP),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj", HEADS_IN),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj", HEADS_IN),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj", HEADS_IN),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj", HEADS_OUT),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_bias", HEADS_BIAS),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_bias", HEADS_BIAS),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_bias", HEADS_BIAS),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o_bias", KEEP),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj", TRANSPOSE),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj", TRANSPOSE),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj", TRANSPOSE),
)

NAME_MAPS = {"llama": LLAMA}

# HF buffers that are recomputed, not loaded.
IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


class NameMap:
    """Translates names both ways with one table."""

    def __init__(self, model_type: str):
        table = NAME_MAPS[model_type]
        self._to_jsft = [(_pattern(hf), jsft, t) for hf, jsft, t in table]
        self._to_hf = [(_pattern(jsft), hf, t) for hf, jsft, t in table]

    @staticmethod
    def _lookup(rules, name: str) -> tuple[str, Transform] | None:
        for pattern, target, transform in rules:
            m = pattern.match(name)
            if m:
                return target.format(**m.groupdict()), transform
        return None

    def to_jsft(self, hf_name: str) -> tuple[str, Transform] | None:
        return self._lookup(self._to_jsft, hf_name)

    def to_hf(self, jsft_name: str) -> tuple[str, Transform]:
        found = self._lookup(self._to_hf, jsft_name)
        if found is None:
            raise KeyError(f"no Hugging Face name for jsft parameter {jsft_name!r}")
        return found
