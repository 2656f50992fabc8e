"""Exact resume under faults: SIGKILL, SIGTERM, damaged checkpoints, other device counts.

Each run is a real `python -m jsft.train` process on the tiny config (with a smaller data mix).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY_DATA

from jsft import checkpoint, sharding

STEPS = 24
EVERY = 4


def _command(out: pathlib.Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jsft.train",
        f"--config={ROOT}/configs/tiny.py",
        f"--config.output_dir={out}",
        f"--config.data.mixer=(('{TINY_DATA}/train.jsonl', 1500),)",
        "--config.data.eval_mixer=()",
        f"--config.train.max_steps={STEPS}",
        f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.keep=10",
        "--config.log.every_steps=1",
        *extra,
    ]


def _env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(out, *extra, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *extra), env=_env(devices), capture_output=True, text=True, cwd=ROOT)


def _records(out) -> dict[int, dict]:
    """The last logged record of each step (a resumed run logs again the steps after its checkpoint)."""
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            records[r["step"]] = r
    return records


def _logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max(
        (json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()), default=0
    )


def _start_and_signal(out, sig, after_step: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        _command(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while _logged_steps(out) < after_step:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc


def _final_params(out, step=STEPS) -> dict[str, np.ndarray]:
    mngr = checkpoint.manager(str(out / "checkpoints"), read_only=True)
    layout, _ = checkpoint.saved_layout(mngr, step)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    import jax

    params, _, _ = checkpoint.restore_for_export(mngr, step, layout.shapes, layout.shardings(mesh))
    return {k: np.asarray(jax.device_get(v)) for k, v in params.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigkill_then_restart_equals_an_uninterrupted_run(reference, tmp_path):
    seed = int(os.environ.get("JSFT_TEST_SEED", random.SystemRandom().randrange(2**32)))
    kill_at = random.Random(seed).randint(EVERY + 1, STEPS - 3)
    print(f"kill step {kill_at} (replay with JSFT_TEST_SEED={seed})")
    proc = _start_and_signal(tmp_path, signal.SIGKILL, kill_at)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    expected, got = _records(reference), _records(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # no batch skipped or repeated, the same losses bit for bit
        assert got[step]["batch_fingerprint"] == expected[step]["batch_fingerprint"], step
        assert got[step]["loss"] == expected[step]["loss"], step
    ref_params, new_params = _final_params(reference), _final_params(tmp_path)
    for name, value in ref_params.items():
        np.testing.assert_array_equal(new_params[name], value, err_msg=name)


def test_sigterm_saves_the_step_reached_and_exits_cleanly(reference, tmp_path):
    proc = _start_and_signal(tmp_path, signal.SIGTERM, 6)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop requested: saved step" in stderr
    stopped_at = _logged_steps(tmp_path)
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True)
    assert mngr.latest_step() == stopped_at < STEPS
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stderr
    assert _records(tmp_path)[STEPS]["loss"] == _records(reference)[STEPS]["loss"]


def _copy_run(reference, out, keep_up_to: int = STEPS) -> None:
    """A copy of the reference run as it stood after `keep_up_to` steps."""
    shutil.copytree(reference, out, dirs_exist_ok=True)
    for folder in (out / "checkpoints").iterdir():
        if folder.name.isdigit() and int(folder.name) > keep_up_to:
            shutil.rmtree(folder)


def test_damaged_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    _copy_run(reference, tmp_path)
    # a save killed midway leaves only Orbax's temporary folder; a finished one may still be truncated
    (tmp_path / "checkpoints" / f"{STEPS + 4}.orbax-checkpoint-tmp-1").mkdir()
    files = [p for p in (tmp_path / "checkpoints" / str(STEPS) / "params").rglob("*") if p.is_file()]
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint step {STEPS} cannot be restored" in resumed.stderr
    assert f"resumed from step {STEPS - EVERY}" in resumed.stderr
    assert any(p.name.startswith(f"corrupt-{STEPS}-") for p in (tmp_path / "checkpoints").iterdir())
    assert _records(tmp_path)[STEPS]["loss"] == _records(reference)[STEPS]["loss"]
    ref_params, new_params = _final_params(reference), _final_params(tmp_path)
    for name, value in ref_params.items():
        np.testing.assert_array_equal(new_params[name], value, err_msg=name)


@pytest.mark.parametrize("devices, mesh", [(4, ("1", "2", "2")), (1, ("1", "1", "1"))])
def test_resume_on_fewer_devices_continues_with_the_same_loss(reference, tmp_path, devices, mesh):
    _copy_run(reference, tmp_path, keep_up_to=8)  # saved on 8 devices, data-parallel
    data, fsdp, tensor = mesh
    resumed = _run(
        tmp_path,
        f"--config.mesh.data={data}",
        f"--config.mesh.fsdp={fsdp}",
        f"--config.mesh.tensor={tensor}",
        devices=devices,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 8" in resumed.stderr
    expected, got = _records(reference), _records(tmp_path)
    for step in range(9, STEPS + 1):
        assert got[step]["batch_fingerprint"] == expected[step]["batch_fingerprint"]
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4)


def test_changed_config_is_refused(reference, tmp_path):
    first = _run(tmp_path, "--config.train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _run(tmp_path, "--config.train.max_steps=4", "--config.optim.lr=0.1")
    assert refused.returncode != 0
    assert "differs from the one" in refused.stderr and "optim.lr" in refused.stderr
    fresh = _run(tmp_path, "--config.train.max_steps=4", "--config.checkpoint.resume=False")
    assert fresh.returncode != 0 and "already holds checkpoints" in fresh.stderr
    # Forcing a change of the parameter layout is refused too, and leaves every checkpoint in place.
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    for change in ("--config.model.scan_layers=False", "--config.lora.rank=4"):
        forced = _run(tmp_path, "--config.train.max_steps=4", change, "--config.checkpoint.force_resume=True")
        assert forced.returncode != 0 and "laid out differently" in forced.stderr, forced.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
