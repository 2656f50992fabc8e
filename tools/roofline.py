"""Expected step time and MFU of a config on TPU slices, from its compiled program (needs libtpu).

    python tools/roofline.py [--topology=v5p-64,v6e-64] [--config=configs/tulu.py] [--config.KEY=VALUE]

Each op of the TPU compiler's program takes the longer of its matmul FLOPs at the chip's bf16 peak and
its HBM bytes at the HBM bandwidth, times its loops' trips ("ops"; "HBM-bound" is the part beyond the
matmuls); collective time = bytes each device moves (result sizes and loop trip counts read from the
program, ring factors) / ICI bandwidth. Async collectives overlap the ops, synchronous ones add to them.
Peaks: `jsft.hardware.CHIPS` (Cloud TPU v5e, v5p and v6e pages). A bound from published peaks, not a
measurement. MFU is the training log's (`jsft.flops.MFU_DEFINITION`: model FLOPs with causal attention),
so it is compute time / step time.
"""

from __future__ import annotations

import sys

from jsft import hardware
from jsft.cli import tpu
from jsft.units import GIB


def main() -> None:
    for name, report in tpu.reports(tpu.with_tool_defaults(sys.argv)):
        chip = hardware.topology(name).chip
        r = report["roofline"]
        print(
            f"{name}: peaks {chip.peak_flops / 1e12:.0f} TFLOP/s, HBM {chip.hbm_bandwidth / 1e9:.0f} GB/s, "
            f"ICI {chip.ici_bandwidth / 1e9:.0f} GB/s per chip\n"
            f"  model FLOPs at peak {r['compute_s']:.3f} s; the program's ops {r['ops_s']:.3f} s, of which "
            f"HBM-bound {r['hbm_bound_s']:.3f} s ({r['hbm_bytes'] / GIB:.0f} GiB of HBM traffic);\n"
            "  async collectives "
            f"{r['async_collectives_s']:.3f} s ({r['async_bytes'] / GIB:.1f} GiB), synchronous collectives "
            f"{r['sync_collectives_s']:.3f} s ({r['sync_bytes'] / GIB:.1f} GiB)\n"
            f"  expected step {r['step_s']:.3f} s, MFU {r['mfu']:.1%}\n"
            f"  (MFU: {report['mfu_definition']})"
        )


if __name__ == "__main__":
    main()
