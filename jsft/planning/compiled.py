"""A run's train step built from config.json alone and compiled, never run: for simulated CPU devices
(XLA:CPU's program, an estimate for GPUs) or for a TPU slice no one owns (the TPU compiler's own).

With `libtpu` installed (`pip install jsft[tpu]`) and JAX's backend on CPU, `get_topology_desc` gives
device objects of a TPU slice; a train step jitted over a mesh of them compiles with the real TPU
compiler (Mosaic kernels included), so its memory analysis is the TPU's own. The command sets that
environment first (`runtime.prepare_tpu_compile`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import tempfile

import jax
from jax.experimental import topologies

from jsft import hardware, models, sharding
from jsft.data.batching import Batching
from jsft.errors import TopologyError
from jsft.planning.steps import step_rows
from jsft.trainer import Trainer

_HBM_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])")


@functools.cache
def topology_devices(name: str) -> list:
    """The JAX devices of a TPU slice (`v5p-64`, `v6e-64`, ...), compile-only, on a CPU machine."""
    topology = hardware.topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(f"--topology={name} needs libtpu: pip install 'jsft[tpu]'")
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology.topology_name,
        chip_config_name=topology.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds,
        num_slices=1,
    )
    return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of a compiled train step, from the compiler's memory analysis."""

    state: float
    batch: float
    temporaries: float
    peak: float
    refused: str = ""  # the TPU compiler's out-of-memory message, when it refused to compile
    host: float = 0.0  # activations offloaded to host memory (`model.remat=offload`), not in the peak

    @classmethod
    def of(cls, compiled, batch_bytes: float) -> Memory:
        m = compiled.memory_analysis()
        live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return cls(
            m.argument_size_in_bytes - batch_bytes,
            batch_bytes,
            m.temp_size_in_bytes,
            live + m.temp_size_in_bytes,
            host=m.host_temp_size_in_bytes,
        )

    @classmethod
    def refused_by_compiler(cls, message: str, state_bytes: float, batch_bytes: float) -> Memory:
        """The TPU compiler stops at a program that cannot fit its HBM (CompileTimeHbmOom) and names
        the temporaries it needed; the state is the shards' own size."""
        found = _HBM_OOM.search(message)
        temporaries = (
            float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024 if found else math.inf
        )
        line = next((x for x in message.splitlines() if "Ran out of memory" in x), message.splitlines()[0])
        return cls(
            state_bytes, batch_bytes, temporaries, state_bytes + batch_bytes + temporaries, line.strip()
        )


def build_trainer(cfg, hf_config: dict, devices: list):
    """The run's Trainer over `devices` (simulated CPU or compile-only TPU), from config.json alone."""
    platform = devices[0].platform
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16"  # an accelerator's choice
    attention = cfg.model.attention
    if platform == "cpu" and attention in ("auto", "splash", "cudnn"):
        attention = "xla"  # the CPU compile stands in for a GPU's or TPU's program
    model_cfg = models.ModelConfig.from_hf(
        hf_config,
        models.dtype_of(dtype),
        models.dtype_of(cfg.model.param_dtype),
        attention,
        cfg.model.remat,
        cfg.model.scan_layers,
    )
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    layout = models.Layout(model_cfg, device=devices[0])  # splash for a TPU topology, on this CPU host
    Batching.from_config(cfg, mesh).check_fits()
    return Trainer(cfg, layout, mesh, total_steps=1000)


def compile_step(trainer, rows: int | None = None, with_text: bool = False):
    """(compiled train step, its Memory, program text or None) for a global batch of `rows` rows
    (default: `step_rows` without data figures). A TPU program too large for HBM, which the TPU
    compiler refuses, gives (None, Memory with `refused` set, None)."""
    rows = rows or step_rows(trainer)[0]
    seq = trainer.cfg.data.max_seq_length
    shards = sharding.batch_shards(trainer.mesh) * trainer.mesh.shape["context"]
    batch_bytes = 5 * 4 * rows * seq / shards  # five int32 [rows, seq] arrays split over rows and tokens
    try:
        if with_text:
            lowered = trainer.train_step.lower(trainer.abstract_state(), trainer.abstract_batch(rows, seq))
            compiled, text = compile_with_text(lowered)
        else:
            compiled, text = trainer.compile_train_step(rows, seq), None
    except jax.errors.JaxRuntimeError as e:
        if "CompileTimeHbmOom" not in str(e):
            raise
        state_bytes = sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(trainer.abstract_state())
        )
        return None, Memory.refused_by_compiler(str(e), state_bytes, batch_bytes), None
    return compiled, Memory.of(compiled, batch_bytes), text


def compile_with_text(lowered) -> tuple[object, str]:
    """(compiled, scheduled program text after optimisation) of a lowered function."""
    with tempfile.TemporaryDirectory() as folder:
        options = {"xla_dump_to": folder, "xla_dump_hlo_as_text": True}
        compiled = lowered.compile(compiler_options=options)
        dumps = sorted(glob.glob(os.path.join(folder, "*after_optimizations.txt")))
        if not dumps:
            raise RuntimeError(f"the compiler wrote no optimised program into {folder}")
        with open(dumps[-1]) as f:
            return compiled, f.read()
