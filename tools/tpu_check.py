"""The compiled TPU program of a config, checked on this CPU machine (needs libtpu: pip install 'jsft[tpu]').

    python tools/tpu_check.py [--topology=v5p-64,v6e-64] [--config=configs/tulu.py] [--config.KEY=VALUE]

Compiles the train step for each TPU slice with the real TPU compiler (splash attention) and prints the
TPU compiler's memory per device, the async collective pairs (and how many have compute scheduled
inside them), the synchronous collectives with their size and repeats per step, the libtpu flags it was
compiled with (jsft's for the slice, `jsft.runtime.libtpu_default_flags`, plus LIBTPU_INIT_ARGS), and
the rules of `jsft.planning.checks.check_program` that the program breaks.
"""

from __future__ import annotations

import sys

from jsft.cli import tpu


def main() -> None:
    for name, report in tpu.reports(tpu.with_tool_defaults(sys.argv)):
        memory = report["memory_gib"]
        print(f"== {name}: {report['devices']} devices, mesh {report['mesh']}")
        print(
            f"memory per device (TPU compiler): state {memory['state']:.2f} GiB, temporaries "
            f"{memory['temporaries']:.2f} GiB, peak {memory['peak']:.2f} "
            f"of {report['device_memory_gib']:.0f} GiB"
        )
        print(f"async pairs: {report['async_pairs']}")
        print(f"splash kernels: {report['splash_kernels']}")
        gib = {k: round(v, 2) for k, v in report["collective_gib_per_step"].items()}
        print(f"collective results per step and device (GiB): {gib}")
        for line in report["sync_collectives"]:
            print(f"  sync {line}")
        for line in report["replicated_all_reduces"]:
            print(f"  replicated-parameter gradient all-reduce (data parallel, not FSDP): {line}")
        print(f"libtpu flags: {report['libtpu_init_args'] or '(none)'}")
        for rule, found in report["problems"].items():
            print(f"{'ok  ' if not found else 'FAIL'} {rule}" + "".join(f"\n       {f}" for f in found[:8]))


if __name__ == "__main__":
    main()
