"""Peak memory against matmul work for each remat policy, from the TPU compiler's programs (needs libtpu).

    python tools/bench/remat_frontier.py [--topology=v5p-64,v6e-64] [--config=configs/tulu.py]
        [--policy=none --policy=custom:save=q_proj,k_proj ...] [--config.KEY=VALUE ...]

For each policy the config's train step is compiled for each slice (`jsft.planning.topology`): peak
memory per device, bytes offloaded to host, and the program's matmul FLOPs per device, read loop by
loop from its text (recomputation included; splash attention is a kernel and not counted), with their
time at the chip's bf16 peak. A program the compiler refuses is printed as such.
"""

from __future__ import annotations

import sys

from jsft import config, runtime

POLICIES = (
    "none",
    "dots_saveable",
    "custom:save=q_proj,k_proj,v_proj,gate_proj,up_proj",
    "custom:save=gate_proj,up_proj",
    "minimal",
    "offload",
    "full",
)


def main(argv: list[str]) -> None:
    policies = [a.split("=", 1)[1] for a in argv if a.startswith("--policy=")] or list(POLICIES)
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--topology=")]
    topologies = (given[-1] if given else "v5p-64,v6e-64").split(",")
    rest = [a for a in argv if not a.startswith(("--topology=", "--policy="))]
    if not any(a.startswith("--config=") for a in rest):
        rest = ["--config=configs/tulu.py", *rest]
    runtime.prepare_tpu_compile(topologies)
    from jsft.planning.topology import remat_frontier  # only now: JAX starts with the TPU environment

    cfg = config.load_or_exit(["remat_frontier", *rest])
    for topology in topologies:
        print(f"{topology}: policy | peak GiB | host GiB | matmul FLOPs per device | matmul s at peak")
        for row in remat_frontier(cfg, topology, policies):
            if row["refused"]:
                print(f"  {row['remat']} | refused: {row['refused']}")
                continue
            print(
                f"  {row['remat']} | {row['peak_gib']:.3f} | {row['host_gib']:.2f} | "
                f"{row['matmul_flops']:.4g} | {row['matmul_s']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
