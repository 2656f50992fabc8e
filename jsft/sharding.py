"""The device mesh and the one table that maps logical axis names onto it.

Every parameter names its axes (vocab, embed, heads, ...); `LOGICAL_RULES` says which mesh axis each
is split over. FSDP, tensor parallelism and pure data parallelism are then mesh sizes, not code.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes; one size may be -1 (the rest)."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    shape_text = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape_text}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {shape_text}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape_text} does not fit {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {shape_text} needs {math.prod(sizes)} devices, but there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
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


def named_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [rows, seq] are split over rows on the data and fsdp axes."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
