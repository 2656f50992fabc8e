"""Two real processes (jax.distributed on 127.0.0.1, CPU collectives over gloo) train like one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import multihost_worker
import numpy as np
import portpicker
import pytest
from conftest import ROOT, assert_params_close, make_hf_llama, tiny_run_args

WORKER = ROOT / "tests" / "multihost_worker.py"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.mark.parametrize(
    "mesh",
    [{"data": 1, "fsdp": -1, "tensor": 1}, {"fsdp": 1, "context": 4}],
    ids=["fsdp_over_processes", "context_over_processes"],
)
def test_two_processes_reach_the_parameters_of_one(tmp_path, mesh):
    """Two processes of 2 devices each against one process of 4 (this one, while they run). With the
    context axis across both processes, they hold the same rows and each feeds its devices' tokens."""
    model = make_hf_llama(tmp_path / "m", hidden_size=48, num_attention_heads=4, head_dim=12, vocab_size=96)
    port = portpicker.pick_unused_port()
    mesh_arg = json.dumps(mesh)
    two = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(model),
                str(tmp_path / "two.npz"),
                "2",
                str(i),
                str(port),
                mesh_arg,
            ],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    b = multihost_worker.train(str(model), num_devices=4)
    for proc in two:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    a = np.load(tmp_path / "two.npz")
    assert set(a.files) == set(b)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    assert_params_close({k: a[k] for k in a.files if k != "losses"}, {k: b[k] for k in b if k != "losses"})


def _start_two_process_run(out, *extra: str, per_process=lambda i: ()) -> list[subprocess.Popen]:
    port = portpicker.pick_unused_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jsft.train",
                *tiny_run_args(out, 1000),
                "--config.log.every_steps=1",
                "--config.mesh.num_processes=2",
                f"--config.mesh.process_id={i}",
                f"--config.mesh.coordinator_address=127.0.0.1:{port}",
                *extra,
                *per_process(i),
            ],
            env=_env(2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def test_two_process_run_saves_together_and_stops_together_on_one_sigterm(tmp_path):
    """One two-process `jsft.train` run checks what needs both processes to agree:
    - process 1 alone finds a time-based save due after every step (as if its clock ran ahead): both
      must save together, or the run would hang in a save only one of them joins;
    - a preemption notice (SIGTERM) that reaches process 0 only: both save the same step, exit cleanly;
    - process 0 alone writes the metrics, and every process writes its data shard of every step."""
    out = tmp_path / "run"
    procs = _start_two_process_run(
        out,
        "--config.train.max_steps=400",
        "--config.checkpoint.every_steps=1000",
        "--config.checkpoint.keep=1000",
        per_process=lambda i: [f"--config.checkpoint.every_minutes={1e-6 if i == 1 else 0.0}"],
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[0].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    saved = [re.search(r"stop requested: saved step (\d+)", err) for err in errors]
    assert all(saved), errors
    step = int(saved[0][1])
    assert int(saved[1][1]) == step < 400
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, step + 1))  # one line per step: process 0 alone writes metrics
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == list(range(2, step + 1))  # time requests take effect one step after they are seen
    for saved_step in kept:
        shards = sorted(
            p.name for p in (out / "checkpoints" / str(saved_step) / "data").glob("process_*.json")
        )
        assert shards == ["process_0-of-2.json", "process_1-of-2.json"], saved_step
