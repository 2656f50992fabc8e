"""The device mesh and the one table that maps logical axis names onto it.

Every parameter names its axes (vocab, embed, heads, ...), and so do the model's main activations
(batch, sequence, activation_embed, heads, mlp, ...); `LOGICAL_RULES` says which mesh axis each is
split over. FSDP, tensor parallelism, pure data parallelism and context parallelism are then mesh
sizes, not code.

Under context parallelism (`context` > 1) a row's tokens are split over the context axis in the
load-balanced "zigzag" order (`context_order`): the row is cut into 2n chunks and device i holds chunks
i and 2n-1-i, so under the causal mask every device has the same attention work. The decoder puts its
inputs in that order and its outputs back (`to_context_order`, `from_context_order`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# The mesh axes that split a batch's rows; `batch_shards` is their product.
ROW_AXES = ("data", "fsdp", "expert")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ROW_AXES,  # expert parallelism is data parallelism outside the experts
    "sequence": "context",
    "vocab": "tensor",
    # weights; activations already split their batch over fsdp (and their tokens over context, their
    # rows over expert: those devices would otherwise each hold the state that fsdp divides)
    "embed": ("fsdp", "context", "expert"),
    "expert": "expert",  # the stacked experts of a mixture-of-experts layer
    "activation_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    # A dense MLP kernel's intermediate dimension. It claims fsdp before the kernel's model dimension
    # ("embed") does (CLAIMS_FIRST). FSDP's collective matmuls then gather gate/up along a dimension
    # their forward pass does not contract, and down along one its input gradient does not: each window
    # writes its own slice of the [tokens, intermediate] product. Split on the model dimension, each
    # window added a partial sum into the whole product, read and written in HBM once a window.
    "mlp_kernel": ("fsdp", "tensor"),
    "norm": None,
    "layers": None,  # the stacked axis of scanned layers
}


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over all devices of all processes; one size may be -1 (the
    rest), an axis `mesh_cfg` does not name has size 1.

    A mesh that does not fit the devices is a one-line ConfigError naming the mesh and the device count.
    """
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
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


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    """Over how many devices a batch's rows split (data x fsdp x expert)."""
    return math.prod(mesh.shape[a] for a in ROW_AXES)


def row_groups(mesh: Mesh) -> tuple[int, int]:
    """(this process's group, the number of groups): processes whose devices hold the same rows of a
    batch (a context or tensor axis reaching across hosts) form a group, and load the same rows.

    Rows are split over data x fsdp x expert; each process must hold one contiguous run of those shards, as
    `make_mesh` lays devices out (process by process), else a one-line ConfigError.
    """
    held: dict[int, set[int]] = {}
    for index, device in np.ndenumerate(mesh.devices):
        coords = dict(zip(mesh.axis_names, index, strict=True))
        shard = int(np.ravel_multi_index([coords[a] for a in ROW_AXES], [mesh.shape[a] for a in ROW_AXES]))
        held.setdefault(device.process_index, set()).add(shard)
    mine = sorted(held[jax.process_index()])
    shards = batch_shards(mesh)
    if mine != list(range(mine[0], mine[0] + len(mine))) or shards % len(mine) or mine[0] % len(mine):
        raise ConfigError(
            f"process {jax.process_index()} holds batch shards {mine} of {shards}: a process's devices must "
            "hold one aligned run of data x fsdp x expert shards (order the mesh as make_mesh does)"
        )
    return mine[0] // len(mine), shards // len(mine)


CLAIMS_FIRST = ("mlp_kernel",)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh) -> P:
    """Partition spec for one array; a dimension the mesh axis does not divide stays replicated.
    Dimensions claim their mesh axes in order, those named in CLAIMS_FIRST before the others."""
    spec, used = [None] * len(axes), set()
    order = sorted(range(len(axes)), key=lambda i: axes[i] not in CLAIMS_FIRST)
    for i in order:
        axis, dim = axes[i], shape[i]
        mesh_axes = LOGICAL_RULES.get(axis) if axis else None
        if isinstance(mesh_axes, tuple):  # a one-device axis splits nothing: leave it out of the spec,
            # as an axis an earlier dimension already uses (experts' embed after their expert axis)
            kept = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
            mesh_axes = (
                kept[0] if len(kept) == 1 else kept or (None if mesh_axes[0] in used else mesh_axes[0])
            )
        if mesh_axes is not None and any(a in used for a in np.atleast_1d(mesh_axes)):
            mesh_axes = None
        if mesh_axes is not None:
            size = math.prod(mesh.shape[a] for a in np.atleast_1d(mesh_axes))
            if dim % size:
                mesh_axes = None
        spec[i] = mesh_axes
        used.update(np.atleast_1d(mesh_axes) if mesh_axes is not None else ())
    return P(*spec)


def traced_platform() -> str | None:
    """The platform ("cpu", "tpu", "gpu") of the devices a program is traced for: under a mesh (the train
    and eval steps are, and TPU programs compiled on this CPU), its devices'; None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None)


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
    """Batches [rows, seq] are split over rows on the data and fsdp axes, and over tokens on context."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], LOGICAL_RULES["sequence"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def single_device_mesh() -> Mesh:
    """The mesh of the first device alone: for loading, export and tools that do not shard."""
    return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def context_size(mesh: Mesh | AbstractMesh | None = None) -> int:
    """How many devices share a row's tokens: the context axis of `mesh` (default: the traced one)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else mesh.shape.get("context", 1)


def context_shards(seq: int) -> int:
    """Over how many devices the traced program splits rows of `seq` tokens in `context_order`: the
    context axis when rows divide into its 2n chunks, else 1 (decoding, and scoring prompts of any
    length, run with plain attention under the same mesh). The decoder and attention both ask this."""
    shards = context_size()
    return shards if shards > 1 and seq % (2 * shards) == 0 else 1


def context_order(seq: int, shards: int) -> np.ndarray:
    """The token index held at each place of a row split over `shards` devices, zigzag-balanced.

    The row is cut into 2 * shards chunks; device i holds chunks i and 2 * shards - 1 - i, one early
    and one late, so each device's queries see the same number of keys under the causal mask. Rows
    must be divisible into the 2 * shards chunks (`config` checks data.max_seq_length).
    """
    chunks = np.arange(seq).reshape(2 * shards, seq // (2 * shards))
    pairs = [(i, 2 * shards - 1 - i) for i in range(shards)]
    return np.concatenate([chunks[c] for pair in pairs for c in pair])


def to_context_order(x: jax.Array, axis: int = 1) -> jax.Array:
    """`x` with its token axis in `context_order` where `context_shards` splits it; else `x`."""
    shards = context_shards(x.shape[axis])
    if shards == 1:
        return x
    return jnp.take(x, context_order(x.shape[axis], shards), axis=axis)


def from_context_order(x: jax.Array, axis: int = 1) -> jax.Array:
    """The inverse of `to_context_order`: tokens back in row order."""
    shards = context_shards(x.shape[axis])
    if shards == 1:
        return x
    return jnp.take(x, np.argsort(context_order(x.shape[axis], shards)), axis=axis)
