"""The tiny model's train step compiled by the real TPU compiler (libtpu) for a v5p-8 slice, on this CPU.

The compile runs in a subprocess (`python -m jsft.tpu`): TPU topologies need a process whose JAX
backend is CPU with libtpu loaded before JAX starts, which the 8 simulated devices of the tests are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("libtpu")

TINY_ON_V5P_8 = [
    "--topology=v5p-8",
    f"--config={ROOT / 'configs' / 'tiny.py'}",
    "--config.model.attention=splash",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-m", "jsft.tpu", *TINY_ON_V5P_8],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_for_the_slice_with_the_tpu_compilers_memory(report):
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    memory = report["memory_gib"]
    # float32 parameters and two Adam moments of 0.84M parameters, split 4 ways: ~2.5 MiB before padding
    assert 2.4 / 1024 < memory["state"] < 8 / 1024
    assert memory["peak"] >= memory["state"] + memory["temporaries"]


def test_splash_kernel_is_the_attention(report):
    assert all(report["splash_kernels"][part] >= 1 for part in ("fwd", "dq", "dkv")), report["splash_kernels"]
    assert report["problems"]["attention not by splash"] == []


def test_no_unexpected_all_to_all_or_whole_stacked_parameter_gather(report):
    assert report["problems"]["unexpected all-to-all"] == []
    assert report["problems"]["whole stacked parameters gathered"] == []


def test_every_async_collective_has_compute_inside(report):
    assert report["problems"]["async pairs without compute between"] == []


@pytest.mark.xfail(
    strict=True,
    reason="libtpu 0.0.52 issues the tiny model's FSDP all-gathers and gradient all-reduces synchronously "
    "on v5p-8 (on the 8B step for v5p-64 the layers' become async collective-permute pairs of windowed "
    "einsums, but the LM head is still gathered and reduced synchronously per loss chunk)",
)
def test_fsdp_parameter_collectives_are_async(report):
    assert report["problems"]["synchronous parameter collectives"] == []
