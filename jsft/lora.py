"""LoRA and QLoRA: trainable low-rank factors beside frozen projection kernels, applied unmerged.

For a target kernel W (its input axes, then its output axes) the model holds A [in..., r] and
B [r, out...] as parameters of the projection's own module (`decoder.LoraParam`, named `<kernel>.lora_a`
and `<kernel>.lora_b`), and computes `y = x W + scale * (dropout(x) A) B` where the projection runs,
inside the layer scan (`decoder._project`). No merged or full-size copy of W, and no gradient for it,
ever exists: the backward through W computes only the input's gradient. B starts at zero, so training
starts exactly from the base model. `scale` is alpha / r, or alpha / sqrt(r) with rsLoRA.

The optimizer sees only the trainable partition (`Layout.trainable`: the factors, plus any base weights
named by `lora.also_train`); the frozen rest is `TrainState.base`, read from the model folder, never
checkpointed, held in the compute dtype (`lora.base_dtype`) or quantized block-wise (`Quantized`:
int8, or NF4 with two codes per byte) and dequantized one layer at a time inside the scan (QLoRA).

Adapters go out as PEFT folders (`peft_tensors`, `jsft.export.write_adapter`) and come in from them
(`lora.init_from`, `load_peft`), under PEFT's key names for every family.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

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
QUANTIZATIONS = ("none", "int8", "nf4")
BASE_DTYPES = ("auto", "float32", "bfloat16")  # auto: the compute dtype (model.dtype)
FACTORS = (".lora_a", ".lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings of a run (the `lora` config group), hashable: modules keep it as static data."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(INPUT_AXES)  # kernel names, e.g. ("q_proj", "v_proj")
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
        targets = tuple(t.strip() for t in get("targets", ",".join(INPUT_AXES)).split(",") if t.strip())
        unknown = sorted(set(targets) - set(INPUT_AXES))
        if unknown or not targets:
            raise JsftError(
                f"lora.targets: unknown {unknown or targets}; choose from {', '.join(INPUT_AXES)}"
            )
        regex = get("target_regex", "")
        also = tuple(t.strip() for t in get("also_train", "").split(",") if t.strip())
        for pattern in (regex, *also):
            try:
                re.compile(pattern)
            except re.error as e:
                raise JsftError(f"lora: bad regular expression {pattern!r}: {e}") from None
        quantization = get("base_quantization", "none")
        if quantization not in QUANTIZATIONS:
            raise JsftError(f"lora.base_quantization: {quantization!r} is not one of {QUANTIZATIONS}")
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

    def also_trains(self, name: str) -> bool:
        """Whether base parameter `name` is trained alongside the factors (`lora.also_train`)."""
        return any(re.fullmatch(p, name) for p in self.also_train)

    def frozen_dtype(self, compute_dtype) -> jnp.dtype:
        """Storage dtype of the frozen base (before any quantization)."""
        from jsft.models import dtype_of

        return jnp.dtype(compute_dtype if self.base_dtype == "auto" else dtype_of(self.base_dtype))

    # --- the frozen base: which kernels are quantized, their quantized shapes and shardings -------------

    def quantized_axis(self, layout: Layout, name: str) -> int | None:
        """The (negative) axis a frozen kernel is quantized along, block by block: its last input axis.
        None for what stays unquantized (embeddings, LM head, norms, biases, trained parameters)."""
        suffix = name.rsplit(".", 1)[-1]
        if self.base_quantization == "none" or suffix not in INPUT_AXES or name in layout.trainable:
            return None
        return INPUT_AXES[suffix] - 1 - len(layout.shapes[name].shape) + int(layout.names.is_stacked(name))

    def _quantizer(self, layout: Layout, name: str):
        axis = self.quantized_axis(layout, name)
        shape = layout.shapes[name].shape
        block = largest_divisor(shape[axis], self.quant_block)
        if self.base_quantization == "nf4" and shape[axis] % 2:
            raise JsftError(f"lora.base_quantization=nf4 packs pairs of values: {name} has {shape[axis]}")
        return functools.partial(quantize, kind=self.base_quantization, axis=axis, block=block)

    def base_shapes(self, layout: Layout) -> dict:
        """Frozen parameter name -> ShapeDtypeStruct, or `Quantized` of them for a quantized kernel."""
        out = {}
        for name, s in layout.shapes.items():
            if name in layout.trainable:
                continue
            if self.quantized_axis(layout, name) is None:
                out[name] = s
            else:
                out[name] = jax.eval_shape(self._quantizer(layout, name), s)
        return out

    def base_shardings(self, layout: Layout, mesh: Mesh) -> dict:
        """Shardings of `base_shapes`: codes and scales split like their kernel, where sizes allow."""
        out = {}
        for name, s in self.base_shapes(layout).items():
            axes = layout.axes[name]
            out[name] = jax.tree.map(
                lambda leaf, axes=axes: sharding.named_sharding(axes, leaf.shape, mesh), s
            )
        return out

    def freeze(self, layout: Layout, name: str, array: jax.Array, mesh: Mesh) -> jax.Array | Quantized:
        """One frozen base array as the run holds it: quantized on its devices if asked (stacked kernels
        one layer at a time, so the temporaries stay one layer's), else as given."""
        if isinstance(array, Quantized) or self.quantized_axis(layout, name) is None:
            return array
        quantizer = self._quantizer(layout, name)
        shardings = self.base_shardings(layout, mesh)[name]
        fn = functools.partial(jax.lax.map, quantizer) if layout.names.is_stacked(name) else quantizer
        return jax.jit(fn, out_shardings=shardings)(array)

    # --- factors: fresh, merged into the base (export) -----------------------------------------------

    def init(self, seed: int, layout: Layout, mesh: Mesh) -> Params:
        """A ~ N(0, 1/fan_in), B = 0: the adapted model starts equal to the base."""
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

    def merge(self, base: Params, trained: Params) -> Params:
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


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


# --- quantized frozen kernels ---------------------------------------------------------------------------

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


@struct.dataclass
class Quantized:
    """A frozen kernel quantized in blocks of `block` consecutive values along `axis` (its last input
    axis, counted from the end so a layer slice of a stacked kernel keeps it), each block with its own
    float32 scale (absmax). int8: one code per value, value = code * scale, scale = absmax / 127. nf4:
    value = NF4_LEVELS[code] * absmax, two 4-bit codes per uint8 along `axis` (low nibble first)."""

    codes: jax.Array
    scales: jax.Array
    kind: str = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)
    block: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.codes.shape)
        shape[self.axis] *= 2 if self.kind == "nf4" else 1
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    def dequantize(self, dtype) -> jax.Array:
        shape = self.shape
        ax = len(shape) + self.axis
        codes = self.codes
        if self.kind == "nf4":
            codes = jnp.stack([codes & 15, codes >> 4], axis=ax + 1).reshape(shape)
            # codes are 0..15 by construction: no clamping of the indices (which XLA:CPU materialises)
            values = jnp.asarray(NF4_LEVELS).at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")
        else:
            values = codes.astype(jnp.float32)
        blocks = values.reshape(*shape[:ax], shape[ax] // self.block, self.block, *shape[ax + 1 :])
        return (blocks * jnp.expand_dims(self.scales, ax + 1)).reshape(shape).astype(dtype)


nnx.register_data_type(Quantized)  # a Param may hold one (the frozen base in `Layout.merge`)


def quantize(w: jax.Array, *, kind: str, axis: int, block: int) -> Quantized:
    """`w` quantized block-wise along `axis` (see `Quantized`); elementwise work only, no large table."""
    shape = w.shape
    ax = len(shape) + axis
    blocks = w.astype(jnp.float32).reshape(*shape[:ax], shape[ax] // block, block, *shape[ax + 1 :])
    absmax = jnp.max(jnp.abs(blocks), axis=ax + 1)
    if kind == "int8":
        scales = jnp.where(absmax > 0, absmax / 127.0, 1.0)
        codes = jnp.clip(jnp.round(blocks / jnp.expand_dims(scales, ax + 1)), -127, 127).astype(jnp.int8)
        return Quantized(codes.reshape(shape), scales, kind, axis, block)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normalized = (blocks / jnp.expand_dims(scales, ax + 1)).reshape(shape)
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # the nearest level: count the midpoints below
    codes = sum((normalized > m).astype(jnp.uint8) for m in midpoints)
    pairs = codes.reshape(*shape[:ax], shape[ax] // 2, 2, *shape[ax + 1 :])
    low, high = jnp.take(pairs, 0, axis=ax + 1), jnp.take(pairs, 1, axis=ax + 1)
    return Quantized((low | (high << 4)).astype(jnp.uint8), scales, kind, axis, block)


# --- PEFT adapters in and out ---------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def _layers(layout: Layout, name: str):
    """(layer index or None, slicer) for each layer a (possibly stacked) parameter covers."""
    if layout.names.is_stacked(name):
        return [(i, functools.partial(lambda x, i: x[i], i=i)) for i in range(layout.cfg.num_layers)]
    return [(None, lambda x: x)]


def peft_tensors(trained: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The trained parameters under PEFT's names and layouts: lora_A [r, in], lora_B [out, r] per HF
    module, and the full tensors of also-trained parameters (PEFT's `modules_to_save`)."""
    out = {}
    for name, value in trained.items():
        value = np.asarray(value)
        kernel, _, factor = name.rpartition(".")
        for layer, take in _layers(layout, name):
            tensor = take(value)
            if factor in ("lora_a", "lora_b"):
                hf_name, _ = layout.names.to_hf(kernel, layer)
                module = PEFT_PREFIX + hf_name.removesuffix(".weight")
                rank = layout.lora.rank
                if factor == "lora_a":
                    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(tensor.reshape(-1, rank).T)
                else:
                    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(tensor.reshape(rank, -1).T)
            else:
                hf_name, transform = layout.names.to_hf(name, layer)
                out[PEFT_PREFIX + hf_name] = np.ascontiguousarray(transform.to_hf(tensor))
    return out


def modules_to_save(layout: Layout) -> list[str]:
    """PEFT's `modules_to_save` for the also-trained parameters: their HF modules' full names (PEFT
    matches name endings, so "model.norm" never catches a layer's norms)."""
    names = set()
    for name in sorted(layout.trainable - layout.adapters):
        for layer, _ in _layers(layout, name):
            hf_name, _ = layout.names.to_hf(name, layer)
            module = hf_name.rsplit(".", 1)[0]
            if module.rsplit(".", 1)[-1] in layout.lora.targets:
                raise JsftError(
                    f"lora.also_train: {name} belongs to an adapted projection; PEFT cannot save it"
                )
            names.add(module)
    return sorted(names)


def peft_config(layout: Layout, base_model: str, revision: str = "") -> dict:
    """adapter_config.json for PEFT's LoraConfig; `revision` is the base model's commit it was trained on."""
    spec = layout.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "modules_to_save": modules_to_save(layout) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def read_peft_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, tensors of adapter_model.safetensors) of a PEFT adapter folder."""
    from safetensors.numpy import load_file

    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise JsftError(
                f"lora.init_from: {folder} is no PEFT adapter folder ({os.path.basename(path)} missing)"
            )
    with open(config_path) as f:
        config = json.load(f)
    return config, load_file(weights_path)


def check_peft_config(config: dict, spec: LoraSpec, folder: str, num_layers: int) -> None:
    """Refuses an adapter the run's `lora` settings would not continue exactly (one line naming them)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise JsftError(f"lora.init_from: {folder} holds a {config.get('peft_type')} adapter, not LoRA")
    unsupported = [
        key
        for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication")
        if config.get(key)
    ]
    unsupported += ["use_dora"] if config.get("use_dora") else []
    unsupported += ["bias"] if config.get("bias", "none") != "none" else []
    if unsupported:
        raise JsftError(f"lora.init_from: {folder} uses PEFT options jsft does not support: {unsupported}")
    target = config.get("target_modules")
    if isinstance(target, str):
        targets = LoraSpec(rank=1, alpha=1, target_regex=target).resolve(num_layers).targets
    else:
        targets = tuple(t.rsplit(".", 1)[-1] for t in target or ())
    wanted = {
        "lora.rank": (int(config.get("r", 8)), spec.rank),
        "lora.alpha": (float(config.get("lora_alpha", 8)), spec.alpha),
        "lora.use_rslora": (bool(config.get("use_rslora", False)), spec.use_rslora),
        "lora.targets": (sorted(targets), sorted(spec.targets)),
    }
    differ = [f"{k}={theirs!r} (run has {ours!r})" for k, (theirs, ours) in wanted.items() if theirs != ours]
    if differ:
        raise JsftError(f"lora.init_from: {folder} was trained with {', '.join(differ)}; set the same")


def from_peft_tensors(tensors: dict[str, np.ndarray], layout: Layout, folder: str) -> dict[str, np.ndarray]:
    """The inverse of `peft_tensors`: host arrays for every trainable parameter of `layout`."""
    out = {}
    used = set()
    for name in sorted(layout.trainable):
        kernel, _, factor = name.rpartition(".")
        slices = []
        for layer, _ in _layers(layout, name):
            if factor in ("lora_a", "lora_b"):
                hf_name, _ = layout.names.to_hf(kernel, layer)
                key = f"{PEFT_PREFIX}{hf_name.removesuffix('.weight')}.lora_{factor[-1].upper()}.weight"
            else:
                hf_name, transform = layout.names.to_hf(name, layer)
                key = PEFT_PREFIX + hf_name
            if key not in tensors:
                raise JsftError(f"lora.init_from: {folder} has no tensor {key}")
            used.add(key)
            slices.append((key, tensors[key]))
        shape = layout.shapes[name].shape
        per_layer = shape[1:] if layout.names.is_stacked(name) else shape
        converted = []
        for key, tensor in slices:
            if factor in ("lora_a", "lora_b"):  # PEFT: A [r, in], B [out, r]
                value = tensor.T.reshape(per_layer)
            else:
                value = transform.to_jsft(tensor, per_layer)
            if value.shape != tuple(per_layer):
                raise JsftError(f"lora.init_from: {key} has shape {tensor.shape}, expected {per_layer}")
            converted.append(np.asarray(value, dtype=layout.shapes[name].dtype))
        out[name] = np.stack(converted) if layout.names.is_stacked(name) else converted[0]
    extra = sorted(set(tensors) - used)
    if extra:
        raise JsftError(f"lora.init_from: {folder} has tensors this run would not train, e.g. {extra[0]}")
    return out


def load_peft(folder: str, layout: Layout, mesh: Mesh) -> Params:
    """The trainable parameters of `layout` from a PEFT adapter folder, placed on `mesh`."""
    config, tensors = read_peft_folder(folder)
    check_peft_config(config, layout.lora, folder, layout.cfg.num_layers)
    host = from_peft_tensors(tensors, layout, folder)
    shardings = layout.shardings(mesh)
    return {name: jax.device_put(value, shardings[name]) for name, value in host.items()}
