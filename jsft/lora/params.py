"""LoRA's parameters as a run holds them, for a `models.Layout` built with a `LoraSpec` (`layout.lora`):
fresh factors, and the frozen base, cast to the base dtype or quantized block-wise on the devices, with
its shapes and shardings (what `TrainState.base` holds: never checkpointed, read from the model folder).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jsft import sharding
from jsft.errors import JsftError
from jsft.lora.quant import Quantized, largest_divisor, quantize
from jsft.models import Layout, Params


def init_factors(layout: Layout, seed: int, mesh: Mesh) -> Params:
    """A ~ N(0, 1/fan_in), B = 0 for every factor: the adapted model starts equal to the base."""
    shapes = {n: layout.shapes[n] for n in sorted(layout.adapters)}
    shardings = layout.shardings(mesh)

    def create():
        keys = jax.random.split(jax.random.key(seed), len(shapes))
        out = {}
        for key, (name, s) in zip(keys, shapes.items(), strict=True):
            if name.endswith(".lora_a"):
                lead = int(layout.names.is_stacked(name))
                fan_in = math.prod(s.shape[lead:-1])
                out[name] = jax.random.normal(key, s.shape, s.dtype) / jnp.sqrt(fan_in).astype(s.dtype)
            else:
                out[name] = jnp.zeros(s.shape, s.dtype)
        return out

    return jax.jit(create, out_shardings={n: shardings[n] for n in shapes})()


def quantized_axis(layout: Layout, name: str) -> int | None:
    """The (negative) axis a frozen kernel is quantized along, block by block: its last input axis.
    None for what stays unquantized (embeddings, LM head, norms, biases, trained parameters)."""
    if layout.lora.base_quantization == "none" or name in layout.trainable:
        return None
    return layout.kernel_input_axis.get(name)


def _quantizer(layout: Layout, name: str) -> Callable[[jax.Array], Quantized]:
    spec, axis = layout.lora, quantized_axis(layout, name)
    shape = layout.shapes[name].shape
    block = largest_divisor(shape[axis], spec.quant_block)
    if spec.base_quantization == "nf4" and shape[axis] % 2:
        raise JsftError(f"lora.base_quantization=nf4 packs pairs of values: {name} has {shape[axis]}")
    return functools.partial(quantize, kind=spec.base_quantization, axis=axis, block=block)


def base_shapes(layout: Layout) -> dict:
    """Frozen parameter name -> ShapeDtypeStruct, or `Quantized` of them for a quantized kernel."""
    out = {}
    for name, s in layout.shapes.items():
        if name in layout.trainable:
            continue
        if quantized_axis(layout, name) is None:
            out[name] = s
        else:
            out[name] = jax.eval_shape(_quantizer(layout, name), s)
    return out


def base_shardings(layout: Layout, mesh: Mesh) -> dict:
    """Shardings of `base_shapes`: codes and scales split like their kernel, where sizes allow."""
    return {name: _shardings(layout, name, s, mesh) for name, s in base_shapes(layout).items()}


def _shardings(layout: Layout, name: str, shapes, mesh: Mesh):
    axes = layout.axes[name]
    return jax.tree.map(lambda leaf: sharding.named_sharding(axes, leaf.shape, mesh), shapes)


def freeze(layout: Layout, name: str, array: jax.Array, mesh: Mesh) -> jax.Array | Quantized:
    """One frozen base array as the run holds it: quantized on its devices if asked (stacked kernels
    one layer at a time, so the temporaries stay one layer's), else as given."""
    if isinstance(array, Quantized) or quantized_axis(layout, name) is None:
        return array
    quantizer = _quantizer(layout, name)
    shardings = _shardings(layout, name, jax.eval_shape(quantizer, layout.shapes[name]), mesh)
    fn = functools.partial(jax.lax.map, quantizer) if layout.names.is_stacked(name) else quantizer
    return jax.jit(fn, out_shardings=shardings)(array)


def frozen_base(layout: Layout, weights: Params, mesh: Mesh) -> Params:
    """The frozen part of `weights` (the model's, all of them) as the run holds it."""
    return {
        name: freeze(layout, name, w, mesh) for name, w in weights.items() if name not in layout.trainable
    }


def freezer(layout: Layout, mesh: Mesh) -> Callable[[str, jax.Array], jax.Array | Quantized]:
    """`convert(name, array)` for `models.load_params`: each frozen array frozen as soon as it is placed,
    its full-precision copy deleted then, so only one such kernel is on the devices at a time."""

    def convert(name: str, array: jax.Array) -> jax.Array | Quantized:
        if name in layout.trainable:
            return array
        frozen = freeze(layout, name, array, mesh)
        if frozen is not array:
            array.delete()
        return frozen

    return convert
