"""The process around JAX: libtpu's flags, the environment of compile-only runs, the distributed start.

JAX reads these settings once, when its backends start (the first `jax.devices()` or computation), not
when it is imported: each `prepare_*` function must run before that, and the commands call them first.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from collections.abc import MutableMapping, Sequence

import jax
import ml_collections

from jsft import hardware

# libtpu flags jsft sets for TPU programs (training on a TPU and compiling for one here), unless
# LIBTPU_INIT_ARGS names the flag already or JSFT_LIBTPU_DEFAULTS=0; chosen per slice (generation and
# size), since libtpu refuses some flags on some chips and builds collectives differently by slice.
# Checked with libtpu 0.0.52 (an unknown flag aborts libtpu at start).
#
# Collective matmul v2 ("post_spmd"): the partitioner's FSDP all-gather -> einsum and einsum ->
# reduce-scatter become loops of async collective-permutes, each overlapped with the einsum on the part
# already received. Without them only large einsums became windowed (the 8B layers on v5p-64); the tiny
# model's layer all-gathers and gradient all-reduces stayed synchronous on v5p-8, and so did a 2048-wide
# model's (v1 is the default; libtpu's message for it says to migrate to v2 with these two flags).
COLLECTIVE_MATMUL_FLAGS = (
    "--xla_tpu_all_gather_collective_matmul_mode=post_spmd",
    "--xla_tpu_reduce_scatter_collective_matmul_mode=post_spmd",
)
# The latency hiding scheduler's "experimental features" let it place the last permute of a windowed
# gradient reduce-scatter over other work (without them one per layer had nothing between its start and
# done).
SCHEDULER_FLAGS = ("--xla_tpu_enable_all_experimental_scheduler_features=true",)
# MaxText's v5e flags (continuation fusion): an all-gather is started by one fusion, carried through the
# compute fusions that follow and finished by another. libtpu 0.0.52 refuses them on v5p and v6e ("not
# supported on platforms other than TPU v5e"); xla_enable_async_all_gather / xla_enable_async_all_reduce
# change nothing on v5p. Not ablated one by one: MaxText sets the five together.
CONTINUATION_FUSION_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
# Every slice but those LIBTPU_SLICE_FLAGS names (v5p, v6e, v4, v5e up to 16 chips, unknown names).
LIBTPU_DEFAULT_FLAGS = (*COLLECTIVE_MATMUL_FLAGS, *SCHEDULER_FLAGS)
# v5e (jsft.cli.tpu, libtpu 0.0.52): collective matmul's permute loops are async pairs on v5e-8 and
# v5e-16 as on v5p, but on v5e-64 (8x8 chips) libtpu builds them as chains of synchronous
# collective-permutes (Llama-3.2-1B, FSDP over the 64 chips: 12.5 GiB of them a step, 2 async pairs).
# Continuation fusion makes the MLP weights' all-gathers async pairs there instead; the attention
# projections' gathers (done as all-reduces) and the gradient reductions (all-reduces, not
# reduce-scatters) stay synchronous. The collective-matmul flags win over it (both together compile
# as collective matmul alone), so a v5e slice gets one or the other. Roofline step (compute 0.342 s),
# collective matmul -> continuation fusion: 1B on v5e-64 1.144 -> 0.681 s (mostly the HBM bytes of the
# permute loops' ops), the Tulu 8B on v5e-64 5.34 -> 3.15 s; 1B on v5e-16 0.723 -> 0.728 s (even), one
# 1024-wide layer on v5e-8 0.42 -> 0.51 ms (collective matmul ahead). Hence continuation fusion from 32
# chips (v5e-32 not measured). Tried on the 1B on v5e-64 and left out: MaxText's data-parallel
# all-reduce flags, the all-reduce / reduce-scatter fusions (..._fuse_all_reduce, _fuse_reduce_scatter,
# xla_enable_async_all_reduce) and ..._while_loops (no change), ..._fuse_kloop_fusions (0.768 s),
# collective matmul for reduce-scatters only (0.755 s).
# generation -> (fewest chips, flags): a slice of that generation with at least that many chips (the
# count its name ends in) takes these flags instead of LIBTPU_DEFAULT_FLAGS.
LIBTPU_SLICE_FLAGS: dict[str, tuple[int, tuple[str, ...]]] = {
    "v5e": (32, (*CONTINUATION_FUSION_FLAGS, *SCHEDULER_FLAGS)),
}
LIBTPU_FLAGS_CHECKED_WITH = (0, 0, 52)


def libtpu_default_flags(accelerator: str | None) -> tuple[str, ...]:
    """jsft's libtpu flags for a slice or accelerator type ("v5e-64", "v5litepod-64", "v5p-128"); the
    LIBTPU_DEFAULT_FLAGS for an unknown or empty name."""
    name = accelerator or ""
    fewest, flags = LIBTPU_SLICE_FLAGS.get(hardware.tpu_generation(name) or "", (0, LIBTPU_DEFAULT_FLAGS))
    size = hardware.slice_size(name)
    return flags if size is not None and size >= fewest else LIBTPU_DEFAULT_FLAGS


def _flag_name(arg: str) -> str:
    name = arg.lstrip("-").split("=", 1)[0]
    return name[2:] if name.startswith("no") and "=" not in arg else name


def libtpu_init_args(current: str = "", accelerator: str | None = None) -> str:
    """`current` LIBTPU_INIT_ARGS with each of jsft's flags for `accelerator` (`libtpu_default_flags`)
    it does not set itself appended (a flag given there, with any value or as --noNAME, is the user's
    choice and stays)."""
    given = {_flag_name(a) for a in current.split()}
    added = [f for f in libtpu_default_flags(accelerator) if _flag_name(f) not in given]
    return " ".join([*current.split(), *added])


def _libtpu_version() -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(n) for n in numbers.groups()) if numbers else None


def set_libtpu_defaults(
    environ: MutableMapping[str, str] = os.environ, accelerator: str | None = None
) -> None:
    """Adds jsft's flags for `accelerator` (`libtpu_default_flags`: a slice name, "v5e-64"; by default the
    TPU VM's TPU_ACCELERATOR_TYPE, "v5litepod-64") to LIBTPU_INIT_ARGS, keeping what the user set; call
    before JAX initialises its backends (libtpu reads the variable once). Only with a pip-installed
    libtpu at least as new as LIBTPU_FLAGS_CHECKED_WITH (an older one may not know a flag, and aborts on
    it); JSFT_LIBTPU_DEFAULTS=0 turns it off."""
    version = _libtpu_version()
    if (
        environ.get("JSFT_LIBTPU_DEFAULTS", "1") == "0"
        or version is None
        or version < LIBTPU_FLAGS_CHECKED_WITH
    ):
        return
    if accelerator is None:
        accelerator = environ.get("TPU_ACCELERATOR_TYPE", "")
    environ["LIBTPU_INIT_ARGS"] = libtpu_init_args(environ.get("LIBTPU_INIT_ARGS", ""), accelerator)


def _cpu_backend() -> None:
    """JAX's own backend is the CPU (JAX_PLATFORMS for child processes; jax.config because JAX read the
    variable when it was imported)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def prepare_tpu_compile(topologies: Sequence[str] = ()) -> None:
    """Environment for compiling TPU programs on this machine (`jsft.planning.compiled.topology_devices`)
    for the slices `topologies` ("v5e-64", ...).

    JAX's own backend stays CPU. Several processes may load libtpu at once (other JAX processes of
    the machine hold its lock file otherwise), and no cloud metadata server is asked for a TPU. The
    compiler gets the flags a TPU run of jsft gets on that slice (`set_libtpu_defaults`). libtpu
    takes one set of flags per process: slices whose flags differ all get LIBTPU_DEFAULT_FLAGS (said on
    stderr; compile those with flags of their own in a process of their own).
    """
    _cpu_backend()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    flag_sets = {libtpu_default_flags(t) for t in topologies}
    accelerator = topologies[0] if len(flag_sets) == 1 else ""
    if len(flag_sets) > 1 and os.environ.get("JSFT_LIBTPU_DEFAULTS", "1") != "0":
        own = [t for t in topologies if libtpu_default_flags(t) != LIBTPU_DEFAULT_FLAGS]
        print(
            f"jsft: libtpu takes one set of flags per process; {', '.join(topologies)} compile with "
            f"LIBTPU_DEFAULT_FLAGS, not the flags of {', '.join(own)}: compile those in a run of their own",
            file=sys.stderr,
        )
    set_libtpu_defaults(accelerator=accelerator)


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
