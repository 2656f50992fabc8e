"""Will the run fit, and how long will it take?

    python -m jsft.cli.plan --config=FILE [--config.KEY=VALUE ...]   (or jsft-plan)

    --devices=N --device_memory=80GiB   N simulated CPU devices (default: the mesh's size or 8); the
                                        compile is XLA:CPU's, an estimate for GPUs
    --topology=v5p-64                   a TPU slice (needs libtpu): the TPU compiler's own memory
    --mfu=0.4                           the model FLOPs utilisation the wall time assumes
    --examples=N --mean_tokens=T        the data size when the data cache has not been built
    --no_search                         do not look for a setting that fits

Reads only the model's config.json (a local folder, the Hugging Face cache, or jsft's shape table of
known models), never the weights. Prints the parameters (total, trainable), the mesh and each
parameter's sharding, the per-device memory of the compiled train step against the device's memory,
the steps, and the wall time at the stated MFU. When the step does not fit, it searches remat policy x
gradient accumulation x fsdp/context/tensor split, prints the cheapest setting that fits as config overrides,
and compiles it to check. `--verbose` shows the libraries' logs.
"""

from __future__ import annotations

import argparse
import math

import ml_collections

from jsft import config, runtime, units
from jsft.cli import command
from jsft.errors import JsftError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the plan's own flags, the config arguments)."""
    parser = argparse.ArgumentParser(
        prog="jsft-plan",
        usage="jsft-plan --config=configs/<name>.py [--config.KEY=VALUE ...] [options]",
        description="Memory, steps and time of a run before launch, from its compiled train step.",
    )
    parser.add_argument(
        "--devices", type=int, default=0, help="simulated CPU devices (GPUs: XLA:CPU estimate)"
    )
    parser.add_argument("--device_memory", default="", help="memory per device, e.g. 80GiB")
    parser.add_argument(
        "--topology", default="", help="a TPU slice, e.g. v5p-64: the TPU compiler's own plan"
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="the MFU the step time is quoted at")
    parser.add_argument("--examples", type=int, default=0, help="conversations, when no data cache is built")
    parser.add_argument("--mean_tokens", type=float, default=0.0, help="their mean length in tokens")
    parser.add_argument("--no_search", action="store_true", help="do not search for a setting that fits")
    args, rest = parser.parse_known_args(argv)
    problems = [
        (args.topology and args.devices, "give --devices or --topology, not both"),
        (not 0 < args.mfu <= 1, f"--mfu={args.mfu} must be in (0, 1]"),
        (bool(args.examples) != bool(args.mean_tokens), "--examples and --mean_tokens go together"),
        (args.devices < 0 or args.examples < 0 or args.mean_tokens < 0, "sizes must be positive"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"jsft.plan: {message}")
    if args.device_memory:
        try:
            args.device_memory = units.parse_size(args.device_memory)
        except ValueError as e:
            raise SystemExit(f"jsft.plan: --device_memory: {e}") from None
    return args, rest


def prepare_environment(args: argparse.Namespace, mesh: ml_collections.ConfigDict) -> None:
    """Sets up JAX before it starts: the TPU compiler's environment, or CPU devices to simulate (as many
    as `--devices`, else the config's mesh when it names every axis, else 8)."""
    if args.topology:
        runtime.prepare_tpu_compile([args.topology])
        return
    sizes = (mesh.data, mesh.fsdp, mesh.expert, mesh.context, mesh.tensor)
    mesh_size = math.prod(s for s in sizes if s > 0) if -1 not in sizes else 0
    runtime.prepare_cpu_devices(args.devices or mesh_size or 8)


@command("jsft.plan", errors=(JsftError, ValueError))
def main(argv: list[str]) -> None:
    args, config_argv = parse_args(argv)
    cfg = config.load_or_exit(["jsft-plan", *config_argv])
    prepare_environment(args, cfg.mesh)
    from jsft.planning import report  # only now: JAX starts its backends with the environment just set

    report.run(cfg, config_argv, args)


if __name__ == "__main__":
    main()
