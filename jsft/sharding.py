"""The device mesh and the one table that maps logical axis names onto it.

Every parameter names its axes (vocab, embed, heads, ...), and so do the model's main activations
(batch, sequence, activation_embed, heads, mlp, ...); `LOGICAL_RULES` says which mesh axis each is
split over. FSDP, tensor parallelism and pure data parallelism are then mesh sizes, not code.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "vocab": "tensor",
    "embed": "fsdp",  # weights; activations already split their batch over fsdp
    "activation_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the stacked axis of scanned layers
}


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes; one size may be -1 (the rest).

    A mesh that does not fit the devices is a one-line ConfigError naming the mesh and the device count.
    """
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    shape_text = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {shape_text}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {shape_text}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh {shape_text} does not fit {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh {shape_text} needs {math.prod(sizes)} devices, but there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh) -> P:
    """Partition spec for one array; a dimension the mesh axis does not divide stays replicated."""
    spec = []
    for axis, dim in zip(axes, shape, strict=True):
        mesh_axes = LOGICAL_RULES.get(axis) if axis else None
        if mesh_axes is not None:
            size = math.prod(mesh.shape[a] for a in np.atleast_1d(mesh_axes))
            if dim % size:
                mesh_axes = None
        spec.append(mesh_axes)
    return P(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's layout by its logical axes while tracing under a mesh; a no-op without one.

    The mesh is the one set by `jax.set_mesh(mesh)` around the jitted call, or by
    `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` inside the traced function.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def named_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [rows, seq] are split over rows on the data and fsdp axes."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def single_device_mesh() -> Mesh:
    """The mesh of the first device alone: for loading, export and tools that do not shard."""
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
