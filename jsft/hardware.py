"""The accelerators jsft knows: each device's published peaks, and the Cloud TPU slices it compiles for.

One table for the training log's MFU (`flops.device_peak_flops`), the plan's wall time and memory budget,
and the TPU roofline. A leaf: no JAX, so the command lines can read it before JAX starts.
"""

from __future__ import annotations

import dataclasses
import re

from jsft.errors import TopologyError
from jsft.units import GIB


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one JAX device; None where jsft records none."""

    peak_flops: float  # dense (no 2:4 sparsity) bfloat16 FLOP/s
    hbm_bytes: float | None = None
    hbm_bandwidth: float | None = None  # bytes/s
    ici_bandwidth: float | None = None  # bytes/s over all links


# One JAX device is one chip on TPU v4/v5e/v5p/v6e (megacore counts as one), but one TensorCore (half a
# chip) on TPU v2/v3, hence v3's 123e12 / 2. Sources: cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB
# HBM, 2765 GB/s HBM, 4800 Gbps ICI), .../v5e (197 TFLOP/s, 16 GiB, 819 GB/s, 1600 Gbps) and .../v6e
# (918 TFLOP/s, 32 GiB, 1640 GB/s, 3584 Gbps).
TPU_V5P = Chip(459e12, 95 * GIB, 2765e9, 4800e9 / 8)
TPU_V5E = Chip(197e12, 16 * GIB, 819e9, 1600e9 / 8)
TPU_V6E = Chip(918e12, 32 * GIB, 1640e9, 3584e9 / 8)

# Keyed by `jax.Device.device_kind`. CPUs have no entry: their peak depends on the core count, clock and
# SIMD width, so pass it explicitly (`log.peak_flops`, e.g. measured with a large matmul). Uncertain: the
# H200 NVL (600 W, about 835e12) reports the same "NVIDIA H200" name as the SXM part; TPU v7 (Ironwood)
# is left out until its device_kind and per-device split are confirmed.
CHIPS: dict[str, Chip] = {
    "TPU v3": Chip(61.5e12),
    "TPU v4": Chip(275e12),
    "TPU v5 lite": TPU_V5E,  # v5e
    "TPU v5e": TPU_V5E,
    "TPU v5": TPU_V5P,  # v5p reports "TPU v5"
    "TPU v5p": TPU_V5P,
    "TPU v6 lite": TPU_V6E,  # v6e (Trillium)
    "TPU v6e": TPU_V6E,
    "NVIDIA H100 80GB HBM3": Chip(989e12),  # H100 SXM
    "NVIDIA H100 PCIe": Chip(756e12),
    "NVIDIA H100 NVL": Chip(835e12),
    "NVIDIA H200": Chip(989e12),  # H200 SXM
    "NVIDIA A100-SXM4-40GB": Chip(312e12),
    "NVIDIA A100-SXM4-80GB": Chip(312e12),
    "NVIDIA A100-PCIE-40GB": Chip(312e12),
    "NVIDIA A100 80GB PCIe": Chip(312e12),
}
# The device a plan without a TPU topology assumes for its wall time (the GPU XLA:CPU stands in for).
DEFAULT_GPU = "NVIDIA H100 80GB HBM3"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice as `jax.experimental.topologies.get_topology_desc` builds it."""

    chip: Chip
    topology_name: str  # "v5p:4x4x2"
    chip_config: str  # "megacore": one JAX device per v5p chip; "default" elsewhere
    chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)


def _slices(chip: Chip, generation: str, chip_config: str, shapes: dict[int, str]) -> dict[str, Topology]:
    return {f"{generation}-{n}": Topology(chip, f"{generation}:{s}", chip_config) for n, s in shapes.items()}


# Cloud TPU slice names: v5p names count TensorCores (2 per chip, one megacore JAX device), v5e/v6e names
# count chips. Source: cloud.google.com/tpu/docs.
TOPOLOGIES: dict[str, Topology] = {
    **_slices(
        TPU_V5P,
        "v5p",
        "megacore",
        {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "4x4x2", 128: "4x4x4", 256: "4x4x8"},
    ),
    **_slices(TPU_V5E, "v5e", "default", {8: "2x4", 16: "4x4", 64: "8x8", 256: "16x16"}),
    **_slices(TPU_V6E, "v6e", "default", {8: "2x4", 16: "4x4", 64: "8x8", 256: "16x16"}),
}


# Cloud TPU accelerator types (TPU_ACCELERATOR_TYPE on a TPU VM, `gcloud ... --format=value(acceleratorType)`)
# whose generation prefix differs from the slice names above: v5e VMs are "v5litepod-N".
_GENERATION_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def tpu_generation(name: str) -> str | None:
    """The TPU generation ("v5e", "v5p", "v6e", "v4", ...) of a slice or accelerator type name: "v5e-64",
    "v5litepod-64", "v5p-128", "v6e-8"; None for anything else (an empty name, a GPU)."""
    prefix = name.strip().lower().split("-", 1)[0]
    prefix = _GENERATION_ALIASES.get(prefix, prefix)
    return prefix if re.fullmatch(r"v\d+[a-z]?", prefix) else None


def slice_size(name: str) -> int | None:
    """The count a slice or accelerator type name ends in ("v5e-64", "v5litepod-64": 64 chips; v5p and v4
    names count TensorCores, two per chip); None without one."""
    count = re.fullmatch(r"[^-]+-(\d+)", name.strip())
    return int(count.group(1)) if count else None


def topology(name: str) -> Topology:
    """The slice called `name` (`v5p-64`, `v6e-8`, ...); an unknown name is a TopologyError."""
    if name not in TOPOLOGIES:
        raise TopologyError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this `jax.Device.device_kind`, None if unknown."""
    chip = CHIPS.get(device_kind)
    return chip.peak_flops if chip else None
