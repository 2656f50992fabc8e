"""LoRA as a partition of the parameters: frozen base weights, trainable low-rank factors.

For a target kernel W (its input axes, then its output axes), LoRA trains A [in..., r] and B [r, out...]
and the model uses W + (alpha / r) * A @ B. B starts at zero, so training starts from the base model.
The optimizer only ever sees the factors; the base is loaded from the model folder and never saved
again, so LoRA checkpoints are small, and export folds the factors back into W.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jsft import sharding
from jsft.errors import JsftError
from jsft.models import Layout, Params

# Kernel name suffix -> how many leading axes are inputs (o_proj is [heads, head_dim, embed]).
INPUT_AXES = {
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # kernel name suffixes, e.g. ("q_proj", "v_proj")

    @classmethod
    def from_config(cls, lora_cfg) -> LoraSpec | None:
        if lora_cfg.rank == 0:
            return None
        targets = tuple(t.strip() for t in lora_cfg.targets.split(",") if t.strip())
        unknown = sorted(set(targets) - set(INPUT_AXES))
        if unknown or not targets:
            raise JsftError(
                f"lora.targets: unknown {unknown or targets}; choose from {', '.join(INPUT_AXES)}"
            )
        return cls(int(lora_cfg.rank), float(lora_cfg.alpha), targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def kernels(self, layout: Layout) -> dict[str, tuple[int, int]]:
        """Target parameter name -> (leading layer axes: 1 when stacked, else 0; its input axes)."""
        return {
            name: (int(layout.names.is_stacked(name)), INPUT_AXES[suffix])
            for name in layout.shapes
            for suffix in self.targets
            if name.endswith("." + suffix)
        }

    def _factor_axes(self, name: str, layout: Layout, lead: int, n_in: int) -> dict[str, tuple]:
        """{factor name: (shape, logical axes)}: A [layers?, in..., rank], B [layers?, rank, out...]."""
        shape, axes = layout.shapes[name].shape, layout.axes[name]
        cut = lead + n_in
        return {
            f"{name}.lora_a": ((*shape[:cut], self.rank), (*axes[:cut], None)),
            f"{name}.lora_b": ((*shape[:lead], self.rank, *shape[cut:]), (*axes[:lead], None, *axes[cut:])),
        }

    def _factors(self, layout: Layout) -> dict[str, tuple]:
        out = {}
        for name, (lead, n_in) in self.kernels(layout).items():
            out.update(self._factor_axes(name, layout, lead, n_in))
        return out

    def shapes(self, layout: Layout) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            name: jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, (shape, _) in self._factors(layout).items()
        }

    def shardings(self, layout: Layout, mesh: Mesh) -> dict[str, NamedSharding]:
        """Each factor is split like the axes it shares with its kernel; the rank axis is replicated."""
        return {
            name: sharding.named_sharding(axes, shape, mesh)
            for name, (shape, axes) in self._factors(layout).items()
        }

    def init(self, seed: int, layout: Layout, mesh: Mesh) -> Params:
        """A ~ N(0, 1/fan_in), B = 0: the adapted model starts equal to the base."""
        shapes = self.shapes(layout)
        fan_ins = {
            f"{name}.lora_a": math.prod(layout.shapes[name].shape[lead : lead + n_in])
            for name, (lead, n_in) in self.kernels(layout).items()
        }

        def create():
            keys = jax.random.split(jax.random.key(seed), len(shapes))
            out = {}
            for key, (name, s) in zip(keys, sorted(shapes.items()), strict=True):
                if name.endswith(".lora_a"):
                    out[name] = jax.random.normal(key, s.shape, s.dtype) / jnp.sqrt(fan_ins[name])
                else:
                    out[name] = jnp.zeros(s.shape, s.dtype)
            return out

        return jax.jit(create, out_shardings=self.shardings(layout, mesh))()

    def merge(self, base: Params, factors: Params) -> Params:
        """The base parameters with every target kernel replaced by W + scale * A @ B."""
        merged = dict(base)
        for name in {n.rsplit(".", 1)[0] for n in factors}:
            a, b = factors[f"{name}.lora_a"], factors[f"{name}.lora_b"]
            product = functools.partial(jnp.tensordot, axes=1)
            for _ in range(a.ndim + b.ndim - 2 - base[name].ndim):  # stacked layers: one product each
                product = jax.vmap(product)
            delta = product(a, b) * self.scale
            merged[name] = (base[name].astype(jnp.float32) + delta).astype(base[name].dtype)
        return merged
