"""The process around JAX: libtpu's flags, the environment of compile-only runs, the distributed start.

JAX reads these settings once, when its backends start (the first `jax.devices()` or computation), not
when it is imported: each `prepare_*` function must run before that, and the commands call them first.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import MutableMapping

import jax
import ml_collections

# libtpu flags jsft sets for every TPU program (training on a TPU and compiling for one here), unless
# LIBTPU_INIT_ARGS names the flag already or JSFT_LIBTPU_DEFAULTS=0. Checked with libtpu 0.0.52 (an
# unknown flag aborts libtpu at start). Collective matmul v2 ("post_spmd"): the partitioner's FSDP
# all-gather -> einsum and einsum -> reduce-scatter become loops of async collective-permutes, each
# overlapped with the einsum on the part already received. Without them only large einsums became
# windowed (the 8B layers on v5p-64); the tiny model's layer all-gathers and gradient all-reduces stayed
# synchronous on v5p-8, and so did a 2048-wide model's (v1 is the default; libtpu's message for it
# says to migrate to v2 with these two flags). The
# latency hiding scheduler's "experimental features" let it place the last permute of a windowed
# gradient reduce-scatter over other work (without them one per layer had nothing between its
# start and done). MaxText's continuation-fusion flags (xla_tpu_enable_async_collective_fusion_*)
# are refused on v5p and v6e by this libtpu ("not supported on platforms other than TPU v5e"), and
# xla_enable_async_all_gather / xla_enable_async_all_reduce change nothing there.
LIBTPU_DEFAULT_FLAGS = (
    "--xla_tpu_all_gather_collective_matmul_mode=post_spmd",
    "--xla_tpu_reduce_scatter_collective_matmul_mode=post_spmd",
    "--xla_tpu_enable_all_experimental_scheduler_features=true",
)
LIBTPU_FLAGS_CHECKED_WITH = (0, 0, 52)


def _flag_name(arg: str) -> str:
    name = arg.lstrip("-").split("=", 1)[0]
    return name[2:] if name.startswith("no") and "=" not in arg else name


def libtpu_init_args(current: str = "") -> str:
    """`current` LIBTPU_INIT_ARGS with each of LIBTPU_DEFAULT_FLAGS it does not set itself appended
    (a flag given there, with any value or as --noNAME, is the user's choice and stays)."""
    given = {_flag_name(a) for a in current.split()}
    added = [f for f in LIBTPU_DEFAULT_FLAGS if _flag_name(f) not in given]
    return " ".join([*current.split(), *added])


def _libtpu_version() -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(n) for n in numbers.groups()) if numbers else None


def set_libtpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds LIBTPU_DEFAULT_FLAGS to LIBTPU_INIT_ARGS, keeping what the user set; call before JAX
    initialises its backends (libtpu reads the variable once). Only with a pip-installed libtpu at least
    as new as LIBTPU_FLAGS_CHECKED_WITH (an older one may not know a flag, and aborts on it);
    JSFT_LIBTPU_DEFAULTS=0 turns it off."""
    version = _libtpu_version()
    if (
        environ.get("JSFT_LIBTPU_DEFAULTS", "1") == "0"
        or version is None
        or version < LIBTPU_FLAGS_CHECKED_WITH
    ):
        return
    environ["LIBTPU_INIT_ARGS"] = libtpu_init_args(environ.get("LIBTPU_INIT_ARGS", ""))


def _cpu_backend() -> None:
    """JAX's own backend is the CPU (JAX_PLATFORMS for child processes; jax.config because JAX read the
    variable when it was imported)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def prepare_tpu_compile() -> None:
    """Environment for compiling TPU programs on this machine (`jsft.planning.compiled.topology_devices`).

    JAX's own backend stays CPU. Several processes may load libtpu at once (other JAX processes of
    the machine hold its lock file otherwise), and no cloud metadata server is asked for a TPU. The
    compiler gets the flags a TPU run of jsft gets (`set_libtpu_defaults`).
    """
    _cpu_backend()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    set_libtpu_defaults()


def prepare_cpu_devices(count: int) -> None:
    """`count` simulated CPU devices whose compiled programs stand in for accelerators' (memory plans)."""
    # The memory-minimising scheduler: XLA:CPU's default favours concurrency and inflates temporaries.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={count} "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    _cpu_backend()


def initialize_distributed(mesh_cfg: ml_collections.ConfigDict) -> None:
    """Joins a multi-process run: explicit coordinator from the config, else SLURM/TPU auto-detection."""
    if mesh_cfg.num_processes > 1:
        # CPU processes need a collectives backend; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(mesh_cfg.coordinator_address, mesh_cfg.num_processes, mesh_cfg.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
