"""Architecture hyperparameters, read from a Hugging Face `config.json`.

Every supported family is the one decoder in `decoder.py` under a different `ModelConfig`: the fixed
traits of each family (where its norms sit, how they round, q/k norms, embedding scale) are the
`FAMILIES` table; the rest comes from the config file. Over 450 lines on purpose: every family's
reading of config.json (RoPE, windows, experts) in one place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from jsft.config import ATTENTION_IMPLEMENTATIONS, REMAT_CHOICES, parse_custom_remat
from jsft.errors import ModelOptionError, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model_type fixes about the architecture, beyond the numbers in its config.json."""

    qk_norm: str | None = None  # "head": RMSNorm over each head; "projection": over all heads at once
    norm_before_sublayers: bool = True  # RMSNorm on the input of attention and MLP
    norm_after_sublayers: bool = False  # RMSNorm on the output of attention and MLP
    norm_offset: float = 0.0  # Gemma stores RMSNorm scales as `scale - 1`
    norm_scale_in_float32: bool = False  # multiply by the scale before casting back (Gemma, OLMo 2)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    qkv_bias_always: bool = False  # q/k/v biases regardless of `attention_bias` (Qwen2)
    experts: bool = False  # a mixture-of-experts MLP in every layer (`Experts`)
    norm_topk_always: bool = False  # renormalise the top-k router weights whatever config.json says


_GEMMA = Family(norm_after_sublayers=True, norm_offset=1.0, norm_scale_in_float32=True, scale_embeddings=True)

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias_always=True),
    "qwen3": Family(qk_norm="head"),
    "olmo2": Family(
        qk_norm="projection",
        norm_before_sublayers=False,
        norm_after_sublayers=True,
        norm_scale_in_float32=True,
    ),
    "gemma2": _GEMMA,
    "gemma3_text": dataclasses.replace(_GEMMA, qk_norm="head"),
    "qwen3_moe": Family(qk_norm="head", experts=True),
    "mixtral": Family(experts=True, norm_topk_always=True),
    "olmoe": Family(qk_norm="projection", experts=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `modeling_rope_utils` computes each `rope_type`.

    `linear` divides all frequencies by `factor`; `llama3` is Llama 3.1's smoothed split; `yarn` blends
    interpolated and original frequencies between the `beta_fast`/`beta_slow` rotation counts and scales
    cos and sin by `attention_factor`; `dynamic` (NTK) raises the base once a sequence passes
    `max_position_embeddings`; `longrope` divides by `short_factor` or `long_factor` per frequency, the
    long ones once a sequence passes `original_max_position_embeddings`. "A sequence" is the batch's
    largest position + 1, as transformers takes it (`rope.rope_frequencies`).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0
    max_position_embeddings: int = 0  # dynamic: the length past which the base grows
    attention_factor: float = 1.0  # yarn, longrope: multiplies cos and sin
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: round the ramp's ends outwards to whole dimensions
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """What may differ between the layers of one model: the attention window and the RoPE settings.

    Static for compiled code: a model with several kinds (Gemma's local and global layers) runs each
    layer's kind as its own branch (`decoder.Decoder`), so backends with static masks work unchanged.
    """

    sliding_window: int | None
    rope_theta: float
    rope_scaling: RopeScaling | None


@dataclasses.dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP (`moe.MoE`): a softmax router picks `per_token` of `count` SwiGLU experts
    of width `intermediate_size` per token, weighted by their router probabilities (renormalised to sum
    to 1 with `norm_topk_prob`); `router_aux_loss_coef` scales the load-balancing loss in training."""

    count: int
    per_token: int
    intermediate_size: int
    norm_topk_prob: bool
    router_aux_loss_coef: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    local_rope_theta: float | None = None  # sliding-window layers' RoPE base, when it differs (Gemma 3)
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None
    norm_before_sublayers: bool = True
    norm_after_sublayers: bool = False
    norm_offset: float = 0.0
    norm_scale_in_float32: bool = False
    scale_embeddings: bool = False
    attention_scale: float | None = None  # multiplies q.k; default head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the output logits; the loss must apply it
    sliding_window: int | None = None  # a query sees keys with q_index - k_index < sliding_window
    layer_types: tuple[str, ...] = ()  # per layer FULL_ATTENTION or SLIDING_ATTENTION; () = all full
    experts: Experts | None = None  # None: a dense MLP in every layer
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32  # storage dtype
    attention_impl: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    remat: str = "none"  # one of REMAT_CHOICES, or a per-tensor "custom:..." policy
    scan_layers: bool = False  # layers as one `lax.scan` over stacked parameters (compile time flat in depth)

    def __post_init__(self):
        for name, value, choices in (
            ("attention", self.attention_impl, ATTENTION_IMPLEMENTATIONS),
            ("remat", self.remat, REMAT_CHOICES),
        ):
            if value not in choices and not (name == "remat" and parse_custom_remat(value)):
                raise ModelOptionError(f"model.{name}={value!r} is not one of {', '.join(choices)}")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING_ATTENTION

    def attention_kind(self, layer: int) -> AttentionKind:
        if not self.is_sliding(layer):
            return AttentionKind(None, self.rope_theta, self.rope_scaling)
        if self.local_rope_theta:  # Gemma 3: sliding layers have their own RoPE base, unscaled
            return AttentionKind(self.sliding_window, self.local_rope_theta, None)
        return AttentionKind(self.sliding_window, self.rope_theta, self.rope_scaling)

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """The distinct kinds, in the order of their first layer."""
        return tuple(dict.fromkeys(self.attention_kind(i) for i in range(self.num_layers)))

    @property
    def layer_kind_ids(self) -> tuple[int, ...]:
        """Each layer's index into `attention_kinds`."""
        kinds = self.attention_kinds
        return tuple(kinds.index(self.attention_kind(i)) for i in range(self.num_layers))

    @property
    def query_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attention_impl: str = "auto",
        remat: str = "none",
        scan_layers: bool = False,
    ) -> ModelConfig:
        """Builds the config from a parsed HF `config.json`; unsupported features are clear errors."""
        model_type, hidden_act = _supported_type_and_activation(hf)
        family = FAMILIES[model_type]
        num_heads = hf["num_attention_heads"]
        num_layers = hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta, rope_scaling, local_rope_theta = _rope_settings(model_type, hf, head_dim)
        sliding_window = _sliding_window(model_type, hf)
        attention_bias = bool(hf.get("attention_bias", False))
        query_pre_attn_scalar = hf.get("query_pre_attn_scalar")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            local_rope_theta=local_rope_theta,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type.startswith("gemma"))),
            model_type=model_type,
            hidden_act=hidden_act,
            qkv_bias=attention_bias or family.qkv_bias_always,
            o_bias=attention_bias,
            qk_norm=family.qk_norm,
            norm_before_sublayers=family.norm_before_sublayers,
            norm_after_sublayers=family.norm_after_sublayers,
            norm_offset=family.norm_offset,
            norm_scale_in_float32=family.norm_scale_in_float32,
            scale_embeddings=family.scale_embeddings,
            attention_scale=query_pre_attn_scalar**-0.5 if query_pre_attn_scalar else None,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            sliding_window=sliding_window,
            layer_types=_layer_types(model_type, hf, num_layers, sliding_window),
            experts=_experts(model_type, hf) if family.experts else None,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            remat=remat,
            scan_layers=scan_layers,
        )

    def num_params(self) -> int:
        d, f, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        norms = 2 * (self.norm_before_sublayers + self.norm_after_sublayers) * d
        qk_norms = {"head": 2 * hd, "projection": (h + kv) * hd}.get(self.qk_norm, 0)
        biases = self.qkv_bias * (h + 2 * kv) * hd + self.o_bias * d
        if self.experts is not None:  # every expert, and the router
            mlp = self.experts.count * (3 * d * self.experts.intermediate_size + d)
        else:
            mlp = 3 * d * f
        per_layer = d * hd * (2 * h + 2 * kv) + mlp + norms + qk_norms + biases
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head


def _supported_type_and_activation(hf: dict[str, Any]) -> tuple[str, str]:
    """The config's model_type and activation, once both and the rest of its features are supported."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} in config.json; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # Gemma's modeling code reads `hidden_activation`; its config files often carry both keys.
    hidden_act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"unsupported activation {hidden_act!r} in config.json; "
            f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("unsupported mlp_bias=true in config.json")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("unsupported use_bidirectional_attention=true in config.json")
    return model_type, hidden_act


def _experts(model_type: str, hf: dict[str, Any]) -> Experts:
    """The MoE settings as transformers reads them; layouts it would build differently are refused."""
    count = hf.get("num_experts") or hf.get("num_local_experts")  # Qwen3-MoE files use either name
    if not count:
        raise UnsupportedModelError(f"{model_type} config.json lacks num_experts (or num_local_experts)")
    refused = {
        "decoder_sparse_step": hf.get("decoder_sparse_step", 1) != 1,  # dense MLPs between MoE layers
        "mlp_only_layers": bool(hf.get("mlp_only_layers")),
        "router_jitter_noise": bool(hf.get("router_jitter_noise")),  # Mixtral's training-time noise
        "clip_qkv": hf.get("clip_qkv") is not None,  # OLMoE's clamp of q, k, v
    }
    for key, unsupported in refused.items():
        if unsupported:
            raise UnsupportedModelError(f"unsupported {key}={hf[key]!r} in config.json")
    return Experts(
        count=int(count),
        per_token=int(hf["num_experts_per_tok"]),
        intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
        norm_topk_prob=FAMILIES[model_type].norm_topk_always or bool(hf.get("norm_topk_prob")),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def _rope_settings(
    model_type: str, hf: dict[str, Any], head_dim: int
) -> tuple[float, RopeScaling | None, float | None]:
    """(RoPE base, its scaling, the sliding-window layers' own base or None); those layers are unscaled."""
    global_rope, local_rope = _rope_parameters(model_type, hf)
    # transformers' standardize_rope_params: a top-level original_max_position_embeddings (Phi-3 style
    # files) wins over the rope dict's, except in per-layer-type dicts, and max_position_embeddings fills it.
    context = _RopeContext(hf, head_dim, nested=FULL_ATTENTION in (hf.get("rope_parameters") or {}))
    rope_theta, rope_scaling = _rope(global_rope, _default_theta(model_type, "global"), context)
    local_rope_theta = None
    if local_rope is not None:
        local_rope_theta, local_scaling = _rope(local_rope, _default_theta(model_type, "local"), context)
        if local_scaling is not None:
            raise UnsupportedModelError(
                f"unsupported rope scaling {local_scaling.rope_type!r} on sliding-window layers"
            )
    return rope_theta, rope_scaling, local_rope_theta


def _default_theta(model_type: str, kind: str) -> float:
    if model_type == "gemma3_text":
        return {"global": 1_000_000.0, "local": 10_000.0}[kind]
    return 10_000.0


def _rope_parameters(model_type: str, hf: dict[str, Any]) -> tuple[dict, dict | None]:
    """(all or full-attention layers' rope settings, sliding layers' settings or None)."""
    # transformers 5 writes `rope_parameters`, per layer type for Gemma 3; older files `rope_scaling`.
    params = hf.get("rope_parameters") or {}
    if FULL_ATTENTION in params:
        return dict(params[FULL_ATTENTION] or {}), dict(params.get(SLIDING_ATTENTION) or {})
    rope = {"rope_theta": hf["rope_theta"]} if "rope_theta" in hf else {}
    rope.update(params or hf.get("rope_scaling") or {})
    if model_type != "gemma3_text":
        return rope, None
    local = {"rope_theta": hf["rope_local_base_freq"]} if "rope_local_base_freq" in hf else {}
    return rope, local


@dataclasses.dataclass(frozen=True)
class _RopeContext:
    """What the scalings read from outside their rope dict."""

    hf: dict[str, Any]
    head_dim: int
    nested: bool  # the rope dict is one of several per layer type (Gemma 3's `rope_parameters`)

    def number(self, rope: dict[str, Any], key: str, default: Any = None) -> Any:
        """`rope[key]` (or `default` when absent or null), one line naming the key when it is missing."""
        value = rope.get(key)
        if value is None:
            value = default
        if value is None:
            raise UnsupportedModelError(
                f"rope_scaling type {rope.get('rope_type')!r} needs {key!r} in config.json's rope settings"
            )
        return value

    def max_positions(self, rope: dict[str, Any]) -> int:
        if "max_position_embeddings" not in self.hf:
            raise UnsupportedModelError(
                f"rope_scaling type {rope.get('rope_type')!r} needs max_position_embeddings in config.json"
            )
        return int(self.hf["max_position_embeddings"])

    def original_context(self, rope: dict[str, Any]) -> int:
        if not self.nested and self.hf.get("original_max_position_embeddings") is not None:
            return int(self.hf["original_max_position_embeddings"])
        if rope.get("original_max_position_embeddings") is not None:
            return int(rope["original_max_position_embeddings"])
        return self.max_positions(rope)


def _rope(
    rope: dict[str, Any], default_theta: float, context: _RopeContext
) -> tuple[float, RopeScaling | None]:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope = dict(rope, rope_type=rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {rope_type!r} in config.json; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("unsupported partial_rotary_factor in config.json; supported: 1.0")
    theta = float(rope.get("rope_theta", default_theta))
    if rope_type == "default":
        return theta, None
    if rope_type in ("linear", "dynamic"):
        scaling = RopeScaling(rope_type, float(context.number(rope, "factor")))
        if rope_type == "dynamic":
            scaling = dataclasses.replace(scaling, max_position_embeddings=context.max_positions(rope))
        return theta, scaling
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(context.number(rope, "factor")),
            low_freq_factor=float(context.number(rope, "low_freq_factor")),
            high_freq_factor=float(context.number(rope, "high_freq_factor")),
            original_max_position_embeddings=context.original_context(rope),
        )
    return theta, (_yarn if rope_type == "yarn" else _longrope)(rope, context)


def _yarn(rope: dict[str, Any], context: _RopeContext) -> RopeScaling:
    """transformers' `_compute_yarn_parameters`: factor defaults to the context ratio, attention
    factor to YaRN's `0.1 ln(factor) + 1` (or the ratio of two such with `mscale`/`mscale_all_dim`)."""
    original = context.original_context(rope)
    factor = rope.get("factor")
    if factor is None:
        factor = context.max_positions(rope) / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    return RopeScaling(
        "yarn",
        factor=float(factor),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        beta_fast=float(rope.get("beta_fast") or 32),  # transformers: `or`, so 0 means the default too
        beta_slow=float(rope.get("beta_slow") or 1),
        truncate=True if context.nested else bool(rope.get("truncate", True)),
    )


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope(rope: dict[str, Any], context: _RopeContext) -> RopeScaling:
    """transformers' `_compute_longrope_parameters`: per-frequency short and long divisors, factor
    defaulting to the context ratio and attention factor to `sqrt(1 + ln(factor) / ln(original))`."""
    original = context.original_context(rope)
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = context.number(rope, key)
        if not isinstance(values, (list, tuple)) or len(values) != context.head_dim // 2:
            raise UnsupportedModelError(
                f"rope_scaling {key} in config.json must be a list of head_dim / 2 = "
                f"{context.head_dim // 2} numbers, got {values!r:.80}"
            )
        factors[key] = tuple(float(v) for v in values)
    factor = rope.get("factor")
    if factor is None:
        factor = context.max_positions(rope) / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        "longrope",
        factor=float(factor),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        **factors,
    )


def _sliding_window(model_type: str, hf: dict[str, Any]) -> int | None:
    if model_type in ("llama", "olmo2"):
        return None
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window"):
        return None  # Qwen configs carry a sliding_window even when it is switched off
    return hf.get("sliding_window")


def _layer_types(
    model_type: str, hf: dict[str, Any], num_layers: int, sliding_window: int | None
) -> tuple[str, ...]:
    """Which layers use the sliding window, as transformers derives it for each family."""
    if sliding_window is None:
        return ()
    if model_type in ("mistral", "mixtral", "qwen3_moe"):  # every layer slides whenever a window is set
        return (SLIDING_ATTENTION,) * num_layers
    if hf.get("layer_types"):
        types = tuple(hf["layer_types"])
    elif model_type in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", num_layers)
        types = tuple(SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers))
    else:  # Gemma: every `sliding_window_pattern`-th layer is global (Gemma 2 alternates)
        pattern = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
        types = tuple(
            FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers)
        )
    unknown = sorted(set(types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown or len(types) != num_layers:
        raise UnsupportedModelError(
            f"unsupported layer_types {unknown or types} in config.json; "
            f"supported: {num_layers} of {FULL_ATTENTION}, {SLIDING_ATTENTION}"
        )
    return types
