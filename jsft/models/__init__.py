"""Models built from Hugging Face folders.

The hot loop works on a flat dict of arrays keyed by parameter name ("layers.0.attn.q_proj", or
"layers.attn.q_proj" stacked over all layers when they are scanned), the same names the HF name maps
use. `Layout` holds everything else about the model (its NNX graph, shapes, logical axes) and turns
such a dict back into a module inside jitted code.
"""

from __future__ import annotations

import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.typing import DTypeLike

from jsft import hf, sharding
from jsft.config import DTYPES
from jsft.errors import JsftError, ModelFolderError
from jsft.lora.spec import LoraSpec
from jsft.models.attention import resolve_attention_impl, soft_cap
from jsft.models.config import ModelConfig
from jsft.models.decoder import Decoder
from jsft.models.names import IGNORED_HF_TENSORS, NameMap
from jsft.models.projection import LoraParam, Projection, parameter_name
from jsft.models.remat import resolve_remat

log = logging.getLogger(__name__)

Params = dict[str, jax.Array]

_DTYPES = dict(zip(DTYPES, (jnp.float32, jnp.bfloat16), strict=True))


def dtype_of(dtype: str | DTypeLike) -> type:
    """jnp.float32 or jnp.bfloat16 from a name or a dtype (jnp.float32, np.float32), as transformers takes."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise JsftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return _DTYPES[name]


class Layout:
    """The model's structure without its values: split once, merged inside jitted functions.

    With `lora`, the model's projections also hold LoRA factors beside the kernels the spec targets
    (`adapters`, named `<kernel>.lora_a` / `.lora_b`); `trainable` is what the optimizer trains (all
    parameters, or what `LoraSpec.trainable` says: the factors and `lora.also_train`), and the frozen rest
    is stored in the spec's base dtype. `kernel_input_axis` names each projection kernel's last input
    axis (counted from the end), along which a frozen kernel is quantized.

    `device` is one of the devices the model will run on (the mesh's): `model.attention` and
    `model.remat=offload` are resolved for its platform (default: this process's first device), so a
    program compiled for a TPU topology on a CPU host gets splash attention and host offload.
    """

    def __init__(self, cfg: ModelConfig, lora: LoraSpec | None = None, device: jax.Device | None = None):
        cfg = resolve_remat(cfg, device)
        self.cfg = cfg
        self.device = device
        self.attention = resolve_attention_impl(cfg, device)
        self.model_type = cfg.model_type
        self.names = NameMap(self.model_type, stacked=cfg.scan_layers)
        self.lora = lora.resolve(cfg.num_layers) if lora is not None else None
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(
                lambda: Decoder(cfg, rngs=nnx.Rngs(0), lora=self.lora, attention=self.attention)
            )
        self.graphdef, state = nnx.split(abstract)
        self._variables = {parameter_name(path): (path, var) for path, var in nnx.to_flat_state(state)}
        self.adapters = frozenset(n for n, (_, var) in self._variables.items() if isinstance(var, LoraParam))
        self.kernel_input_axis = {
            parameter_name((*path, "kernel")): node.last_input_axis
            for path, node in nnx.iter_graph(abstract)
            if isinstance(node, Projection)
        }
        if self.lora is None:
            self.trainable = frozenset(self._variables)
        else:
            self.trainable = self.lora.trainable(self._variables, self.adapters)
        frozen_dtype = self.lora.frozen_dtype(cfg.dtype) if self.lora is not None else None
        self.shapes = {
            name: var.get_value()
            if name in self.trainable
            else jax.ShapeDtypeStruct(var.get_value().shape, frozen_dtype)
            for name, (_, var) in self._variables.items()
        }
        self.axes = {
            name: var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
            for name, (_, var) in self._variables.items()
        }

    def shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
        return {
            name: sharding.named_sharding(self.axes[name], s.shape, mesh) for name, s in self.shapes.items()
        }

    def merge(self, params: Params) -> Decoder:
        """The module over `params` (cheap: only the graph is rebuilt, at trace time under jit)."""
        flat = [(path, var.replace(value=params[name])) for name, (path, var) in self._variables.items()]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def init(self, seed: int, mesh: Mesh) -> Params:
        """Random parameters (std 0.02 normal, norms at 1), created directly with their shardings."""

        def create():
            model = Decoder(self.cfg, rngs=nnx.Rngs(seed), lora=self.lora)
            flat = nnx.to_flat_state(nnx.state(model))
            return {
                parameter_name(p): v.get_value().astype(self.shapes[parameter_name(p)].dtype) for p, v in flat
            }

        with nnx.use_eager_sharding(False):
            return jax.jit(create, out_shardings=self.shardings(mesh))()


def config_from_folder(
    path: str,
    dtype: str | DTypeLike = "float32",
    param_dtype: str | DTypeLike = "float32",
    attention: str = "auto",
    remat: str = "none",
    scan_layers: bool = False,
    revision: str | None = None,
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, parsed config.json) of a folder or Hub id; keyword choices are the `model` group's."""
    folder = hf.resolve_model(path, revision)
    hf_config = hf.read_config(folder)
    try:
        cfg = ModelConfig.from_hf(
            hf_config, dtype_of(dtype), dtype_of(param_dtype), attention, remat, scan_layers
        )
    except KeyError as e:
        raise ModelFolderError(f"{folder}/config.json lacks the key {e.args[0]!r}") from None
    return cfg, hf_config


def load_params(path: str, layout: Layout, mesh: Mesh, revision: str | None = None, convert=None) -> Params:
    """Reads a folder's (or Hub id's) safetensors tensor by tensor straight into arrays sharded over `mesh`.

    LoRA factors (`layout.adapters`) are not in the folder and not read. `convert(name, array)`, if
    given, replaces each array as soon as it is placed (LoRA quantizes its frozen base this way, so the
    full-precision weights are never all on the devices at once).

    Each tensor stays memory-mapped; every device's shard is sliced from the file, cast to the param
    dtype and copied alone, so host memory holds one shard beyond what is already placed, never a whole
    replicated copy per device. Stacked (scanned) parameters gather each device's shard from the
    memory maps of all their layers.
    """
    path = hf.resolve_model(path, revision)
    names = layout.names
    views = _tensor_views(path, layout)
    base_names = [name for name in layout.shapes if name not in layout.adapters]
    missing = [
        names.to_hf_at(name, index)[0]
        for name in base_names
        for index in _indices(layout, name)
        if index not in views.get(name, {})
    ]
    if missing:
        raise ModelFolderError(f"{path}: missing tensors {', '.join(missing)}")
    shardings = layout.shardings(mesh)
    params: Params = {}
    for name in base_names:
        target, depth = layout.shapes[name], names.index_axes(name)
        if depth:
            read = functools.partial(_stacked_shard, views[name], target.shape[:depth], target.dtype)
        else:
            read = functools.partial(_shard, views[name][()], target.dtype)
        params[name] = jax.make_array_from_callback(target.shape, shardings[name], read)
        if convert is not None:
            params[name] = convert(name, params[name])
    return params


def _indices(layout: Layout, name: str) -> list[tuple[int, ...]]:
    """The index (`NameMap`) of every HF tensor a parameter holds: [()] for one tensor."""
    return list(np.ndindex(*layout.shapes[name].shape[: layout.names.index_axes(name)]))


def _tensor_views(path: str, layout: Layout) -> dict[str, dict[tuple[int, ...], np.ndarray]]:
    """Every tensor of the folder as a memory-mapped view in jsft's name and shape, by its index in the
    parameter (`NameMap`); a tensor with no place in `layout`, or of another shape, is an error."""
    names = layout.names
    views: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for hf_name, tensor in hf.iter_tensors(path):
        found = names.to_jsft(hf_name)
        if found is None:
            if IGNORED_HF_TENSORS.match(hf_name) or (
                hf_name == "lm_head.weight" and layout.cfg.tie_word_embeddings
            ):
                continue
            raise ModelFolderError(f"{path}: tensor {hf_name} has no place in a {layout.model_type} model")
        name, transform, index = found
        target = layout.shapes.get(name)
        if target is None or any(i >= n for i, n in zip(index, target.shape, strict=False)):
            raise ModelFolderError(
                f"{path}: tensor {hf_name} does not fit this config ({name} does not exist)"
            )
        shape = target.shape[len(index) :]
        expected = transform.hf_shape(shape)
        if tensor.shape != expected:
            raise ModelFolderError(
                f"{path}: tensor {hf_name} has shape {tensor.shape}, expected {expected} for {name}"
            )
        views.setdefault(name, {})[index] = transform.to_jsft(tensor, shape)
    return views


def _shard(view: np.ndarray, dtype, index: tuple[slice, ...]) -> np.ndarray:
    """One device's block of a (memory-mapped) tensor, as its own contiguous array in `dtype`.

    The block is first copied in the file's byte order (sequential reads), then rearranged in memory:
    copying a transposed view of the file directly is about 1.5x slower.
    """
    return np.ascontiguousarray(np.array(view[index], order="K"), dtype=dtype)


def _stacked_shard(
    views: dict[tuple[int, ...], np.ndarray], lead_shape: tuple[int, ...], dtype, index: tuple[slice, ...]
) -> np.ndarray:
    """One device's block of a parameter whose leading axes (`lead_shape`: layers when stacked, then
    experts) index HF tensors: its slice of each such tensor, stacked."""
    lead = [range(n)[s] for s, n in zip(index, lead_shape, strict=False)]
    blocks = [_shard(views[i], dtype, index[len(lead) :]) for i in itertools.product(*lead)]
    return np.stack(blocks).reshape(*map(len, lead), *blocks[0].shape)


def load_pretrained(
    path: str,
    dtype: str | DTypeLike = "float32",
    param_dtype: str | DTypeLike | None = None,
    mesh: Mesh | None = None,
    attention: str = "auto",
    revision: str | None = None,
) -> Decoder:
    """The NNX model of a Hugging Face folder or Hub id, parameters placed on `mesh` (default: one device).

    `dtype` (compute) and `param_dtype` (storage, default `dtype`) take a name or a dtype, as in
    transformers' `from_pretrained(dtype=...)`.
    """
    path = hf.resolve_model(path, revision)
    cfg, hf_config = config_from_folder(path, dtype, param_dtype or dtype, attention)
    layout = Layout(cfg)
    mesh = mesh or sharding.single_device_mesh()
    return layout.merge(load_params(path, layout, mesh))


def to_hf_tensors(params: Params, layout: Layout, dtype=None) -> dict[str, np.ndarray]:
    """Host copies of `params` under their HF names and layouts (in `dtype` if given)."""
    names = layout.names
    out = {}
    for name, value in params.items():
        host = np.asarray(jax.device_get(value))
        host = host.astype(dtype) if dtype else host
        for index in np.ndindex(*host.shape[: names.index_axes(name)]):
            hf_name, transform = names.to_hf_at(name, index)
            out[hf_name] = np.ascontiguousarray(transform.to_hf(host[index]))
    return out


__all__ = [
    "Decoder",
    "Layout",
    "ModelConfig",
    "load_params",
    "load_pretrained",
    "soft_cap",
    "to_hf_tensors",
]
