"""The LoRA settings of a run as plain data: which kernels get factors, their rank and scale, the dropout,
what else trains, and how the frozen base is stored. The model (`models.projection`) reads this type, so
this module imports nothing of jsft above `config`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Collection, Iterable

import jax
import jax.numpy as jnp

from jsft import config
from jsft.errors import JsftError

# Each kernel's module under a Hugging Face decoder layer (the same in every supported family).
HF_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
FACTORS = (".lora_a", ".lora_b")  # a factor's name is its kernel's plus one of these


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings of a run (the `lora` config group), hashable: modules keep it as static data."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = config.LORA_TARGETS  # kernel names, e.g. ("q_proj", "v_proj")
    target_regex: str = ""  # full-matched against HF module names, as PEFT does; overrides `targets`
    use_rslora: bool = False
    dropout: float = 0.0
    also_train: tuple[str, ...] = ()  # regexes full-matched against jsft parameter names
    base_dtype: str = "auto"
    base_quantization: str = "none"
    quant_block: int = 64

    @classmethod
    def from_config(cls, lora_cfg) -> LoraSpec | None:
        """None for rank 0 (full fine-tuning). Keys a saved config predates take their defaults."""
        get = lora_cfg.get if hasattr(lora_cfg, "get") else functools.partial(getattr, lora_cfg)
        if int(get("rank", 0)) == 0:
            return None
        known = config.LORA_TARGETS
        targets = tuple(t.strip() for t in get("targets", ",".join(known)).split(",") if t.strip())
        unknown = sorted(set(targets) - set(known))
        if unknown or not targets:
            raise JsftError(f"lora.targets: unknown {unknown or targets}; choose from {', '.join(known)}")
        regex = get("target_regex", "")
        also = tuple(t.strip() for t in get("also_train", "").split(",") if t.strip())
        for pattern in (regex, *also):
            try:
                re.compile(pattern)
            except re.error as e:
                raise JsftError(f"lora: bad regular expression {pattern!r}: {e}") from None
        quantization = get("base_quantization", "none")
        if quantization not in config.QUANTIZATIONS:
            raise JsftError(f"lora.base_quantization: {quantization!r} is not one of {config.QUANTIZATIONS}")
        dropout = float(get("dropout", 0.0))
        if not 0.0 <= dropout < 1.0:
            raise JsftError(f"lora.dropout must be in [0, 1), got {dropout}")
        return cls(
            rank=int(get("rank", 0)),
            alpha=float(get("alpha", 16.0)),
            targets=targets,
            target_regex=regex,
            use_rslora=bool(get("use_rslora", False)),
            dropout=dropout,
            also_train=also,
            base_dtype=get("base_dtype", "auto"),
            base_quantization=quantization,
            quant_block=int(get("quant_block", 64)),
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def resolve(self, num_layers: int) -> LoraSpec:
        """The spec with `target_regex` turned into kernel names, checked to select whole kernels: every
        layer's `model.layers.{i}.<module>` or none (stacked layers share their factors' shape)."""
        if not self.target_regex:
            return self
        targets = []
        for kernel, module in HF_MODULES.items():
            hits = [re.fullmatch(self.target_regex, f"model.layers.{i}.{module}") for i in range(num_layers)]
            if any(hits) and not all(hits):
                raise JsftError(
                    f"lora.target_regex={self.target_regex!r} selects {kernel} in some layers only; "
                    "jsft adapts a kernel in every layer or in none"
                )
            if all(hits):
                targets.append(kernel)
        if not targets:
            raise JsftError(f"lora.target_regex={self.target_regex!r} selects no projection")
        return dataclasses.replace(self, targets=tuple(targets), target_regex="")

    def trainable(self, names: Iterable[str], factors: Collection[str]) -> frozenset[str]:
        """What the optimizer trains among the model's parameter `names`: the `factors`, and the base
        parameters `also_train` names. The rest is the frozen base."""
        return frozenset(n for n in names if n in factors or any(re.fullmatch(p, n) for p in self.also_train))

    def frozen_dtype(self, compute_dtype) -> jnp.dtype:
        """Storage dtype of the frozen base (before any quantization)."""
        return jnp.dtype(compute_dtype if self.base_dtype == "auto" else self.base_dtype)

    def merge(self, base: dict[str, jax.Array], trained: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The base parameters with every adapted kernel replaced by W + scale * A @ B (in float32, cast
        to W's dtype) and every also-trained parameter by its trained value: for the merged export."""
        merged = dict(base)
        for name, value in trained.items():
            if not name.endswith(FACTORS):
                merged[name] = value.astype(base[name].dtype)
        for name in {n.rsplit(".", 1)[0] for n in trained if n.endswith(FACTORS)}:
            a, b = trained[f"{name}.lora_a"], trained[f"{name}.lora_b"]
            product = functools.partial(jnp.tensordot, axes=1)
            for _ in range(a.ndim + b.ndim - 2 - base[name].ndim):  # stacked layers: one product each
                product = jax.vmap(product)
            delta = product(a.astype(jnp.float32), b.astype(jnp.float32)) * self.scale
            merged[name] = (base[name].astype(jnp.float32) + delta).astype(base[name].dtype)
        return merged
