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
from conftest import ROOT, tiny_run_args

from jsft import checkpoint, guards, sharding

STEPS = 24
EVERY = 4


def _command(out: pathlib.Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jsft.train",
        *tiny_run_args(out, 1500),
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


def test_ctrl_c_saves_the_step_reached_and_exits_cleanly(reference, tmp_path):
    """SIGINT (Ctrl-C) as SIGTERM: it was a KeyboardInterrupt traceback and no checkpoint. (SIGTERM takes
    the same path: tests/test_multihost.py sends it to one of two processes.)"""
    proc = _start_and_signal(tmp_path, signal.SIGINT, 6)
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


def test_sigterm_before_the_data_is_encoded_saves_the_first_step_and_exits_cleanly(tmp_path):
    """The handlers were installed after the first step, so a SIGTERM while encoding or compiling killed the
    process. Now they hold from the run lock on: a stop asked before the data is encoded (a fresh cache, the
    signal sent as soon as the lock exists) saves at the first step boundary and exits 0."""
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        _command(tmp_path, f"--config.data.cache_dir={cache}", "--config.data.num_proc=1"),
        env=_env(devices=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 120
    while not (tmp_path / guards.LOCK_NAME).exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    assert not list(cache.rglob("stats.json"))  # the data is not encoded yet
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop requested: saved step 1 " in stderr
    assert checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True).latest_step() == 1


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


def _config(out, *extra: str):
    """The config `_command` runs with, loaded in this process."""
    from jsft import config

    return config.load(["prog", *_command(out, *extra)[3:]])


def _trainer_for(cfg, checkpointer):
    import jax

    from jsft import train
    from jsft.data.batching import Batching
    from jsft.trainer import Trainer

    layout, tokenizer, _ = train.load_model_description(cfg, cfg.model.path, jax.devices()[0])
    train_data, _ = train.load_data(cfg, tokenizer)
    checkpointer.attach(
        iter(Batching.from_config(cfg).train_batches(train_data.examples)), total_steps=STEPS, hf_assets={}
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    return Trainer(cfg, layout, mesh, total_steps=STEPS, checkpointer=checkpointer)


def test_refusals_in_process(reference, tmp_path):
    """A changed config, a fresh start over checkpoints, a missing checkpoint.step, another process
    count and (even forced) another parameter layout are refused before anything is trained or moved."""
    from jsft.checkpoint import Checkpointer
    from jsft.errors import JsftError

    _copy_run(reference, tmp_path, keep_up_to=8)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(JsftError, match=r"differs from the one .* in optim\.lr"):
        Checkpointer(_config(tmp_path, "--config.optim.lr=0.1"))
    with pytest.raises(JsftError, match="already holds checkpoints"):
        Checkpointer(_config(tmp_path, "--config.checkpoint.resume=False"))
    with pytest.raises(JsftError, match=r"checkpoint.step=6 is not in .*kept: \[4, 8\]"):
        Checkpointer(_config(tmp_path, "--config.checkpoint.step=6"))
    for change in ("--config.model.scan_layers=False", "--config.lora.rank=4"):
        cfg = _config(tmp_path, change, "--config.checkpoint.force_resume=True")
        trainer = _trainer_for(cfg, Checkpointer(cfg))
        with pytest.raises(JsftError, match="laid out differently"):
            trainer.load_state(cfg.model.path)
    # a run written by two processes holds one data position per process
    for meta_file in (tmp_path / "checkpoints").glob("*/meta/*"):
        if meta_file.is_file() and '"process_count"' in meta_file.read_text():
            meta = json.loads(meta_file.read_text())
            meta["process_count"] = 2
            meta_file.write_text(json.dumps(meta))
    with pytest.raises(JsftError, match="written by 2 processes and this run has 1"):
        Checkpointer(_config(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_checkpoint_step_restores_that_step_exactly(reference, tmp_path):
    from jsft.checkpoint import Checkpointer

    _copy_run(reference, tmp_path)
    cfg = _config(tmp_path, "--config.checkpoint.step=8")
    state = _trainer_for(cfg, Checkpointer(cfg)).load_state(cfg.model.path)
    assert int(state.step) == 8
    expected = _final_params(reference, step=8)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(state.params[name]), value, err_msg=name)


def test_overwrite_moves_the_previous_run_aside(reference, tmp_path):
    from jsft.checkpoint import Checkpointer

    _copy_run(reference, tmp_path, keep_up_to=8)
    Checkpointer(_config(tmp_path, "--config.checkpoint.resume=False", "--config.checkpoint.overwrite=True"))
    (aside,) = tmp_path.glob("checkpoints.old-*")
    assert sorted(p.name for p in aside.iterdir() if p.name.isdigit()) == ["4", "8"]
    assert (aside / "metrics.jsonl").is_file() and not (tmp_path / "metrics.jsonl").exists()
    assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


def test_forced_resume_with_time_based_saves_and_keep(reference, tmp_path):
    """force_resume continues a run whose lr and length changed; `every_minutes` with one process saves
    after every step here, and `keep=2` prunes all but the last two steps."""
    from jsft import train

    _copy_run(reference, tmp_path)
    cfg = _config(
        tmp_path,
        "--config.optim.lr=0.002",
        f"--config.train.max_steps={STEPS + 3}",
        "--config.checkpoint.force_resume=True",
        "--config.checkpoint.every_minutes=1e-6",
        "--config.checkpoint.every_steps=1000",
        "--config.checkpoint.keep=2",
    )
    summary = train.run(cfg)
    assert summary["steps"] == STEPS + 3 and not summary["stopped"]
    assert sorted(_records(tmp_path)) == list(range(1, STEPS + 4))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [STEPS + 2, STEPS + 3]


def _listing(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_resuming_an_older_step_sets_the_later_ones_aside_and_saves_its_own(reference, tmp_path):
    """checkpoint.step=16 with another lr: steps 20 and 24 of the old run are kept aside (never deleted),
    and step 24 on disk is the new run's (it was the old run's, silently, before)."""
    from jsft import train

    _copy_run(reference, tmp_path)
    cfg = _config(
        tmp_path,
        "--config.checkpoint.step=16",
        "--config.optim.lr=0.002",
        "--config.checkpoint.force_resume=True",
    )
    assert train.run(cfg)["steps"] == STEPS
    aside = sorted(int(n.split("-")[1]) for n in _listing(tmp_path) if n.startswith("superseded-"))
    assert aside == [20, 24]
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True)
    assert mngr.latest_step() == STEPS
    assert checkpoint.read_json_item(mngr, STEPS, "meta")["config"]["optim"]["lr"] == 0.002


def test_a_damaged_meta_item_falls_back_to_the_previous_step(reference, tmp_path):
    """A truncated `meta` of the newest step was a JSONDecodeError traceback; now it is moved aside."""
    from jsft.checkpoint import Checkpointer

    _copy_run(reference, tmp_path)
    for p in (tmp_path / "checkpoints" / str(STEPS) / "meta").rglob("*"):
        if p.is_file():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    checkpointer = Checkpointer(_config(tmp_path))
    checkpointer.close()
    assert checkpointer.mngr.latest_step() == STEPS - EVERY
    assert any(n.startswith(f"corrupt-{STEPS}-") for n in _listing(tmp_path))


def test_a_storage_error_never_moves_a_step_aside(reference, tmp_path, monkeypatch):
    """A read that times out is retried and then stops the run in one line, moving nothing; a failure
    that does not repeat on the second try is not damage either."""
    from jsft.checkpoint import Checkpointer
    from jsft.errors import JsftError

    _copy_run(reference, tmp_path)
    before = _listing(tmp_path)
    monkeypatch.setattr(checkpoint, "RETRY_SECONDS", 0.0)
    read = checkpoint.read_json_item

    def unavailable(*args, **kwargs):
        raise TimeoutError("DEADLINE_EXCEEDED reading the bucket")

    monkeypatch.setattr(checkpoint, "read_json_item", unavailable)
    with pytest.raises(JsftError, match=rf"reading checkpoint step {STEPS} .* failed 4 times \(TimeoutError"):
        Checkpointer(_config(tmp_path))
    assert _listing(tmp_path) == before
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ValueError("a read that failed once")
        return read(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_json_item", fails_once)
    checkpointer = Checkpointer(_config(tmp_path))
    checkpointer.close()
    assert checkpointer.mngr.latest_step() == STEPS and _listing(tmp_path) == before


def _file_size_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_at_a_save_stops_the_run_in_one_line_and_keeps_the_earlier_steps(reference, tmp_path):
    """No file may grow past 1 MB (the optimizer state of a step is ~5.7 MB): the save of step 12 fails.
    Before, the run trained on to the end and died in ~800 lines of traceback, losing every step. Now the
    failure is seen at a step boundary once the background write has failed, at the latest before the next
    save starts (step 16 here), and the run stops."""
    _copy_run(reference, tmp_path, keep_up_to=8)
    proc = subprocess.run(
        _command(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=_file_size_limit(2**20),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Orbax's writer threads print their own tracebacks as they fail; the run's verdict is one line.
    (verdict,) = [line for line in proc.stderr.splitlines() if line.startswith("jsft: error: ")]
    assert verdict.startswith("jsft: error: saving a checkpoint in ") and "File too large" in verdict
    last_logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert last_logged <= 16 < STEPS  # stopped by the next save (step 16), not at the end
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True)
    assert sorted(mngr.all_steps()) == [4, 8]
    ref = _final_params(reference, step=8)
    for name, value in _final_params(tmp_path, step=8).items():
        np.testing.assert_array_equal(value, ref[name], err_msg=name)


def test_a_resume_whose_data_changed_is_refused_naming_the_source(reference, tmp_path):
    """The checkpoint records each training source's content hash: other data under the same path (2000
    rows become 1500, one row edited) would take the old data position silently; it is refused unless
    forced."""
    from jsft.checkpoint import Checkpointer
    from jsft.data import sources
    from jsft.errors import JsftError

    _copy_run(reference, tmp_path)
    cfg = _config(tmp_path)
    ((source, *_),) = cfg.data.mixer
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True)
    saved = checkpoint.read_json_item(mngr, STEPS, "meta")["data"]
    assert saved == {source: sources.fingerprint(source)}
    with Checkpointer(cfg) as checkpointer:
        checkpointer.attach(iter(()), total_steps=STEPS, hf_assets={}, data_identity=saved)  # same data
        with pytest.raises(JsftError, match=f"the data source {source} differs from the one step {STEPS}"):
            checkpointer.attach(iter(()), total_steps=STEPS, hf_assets={}, data_identity={source: "local:x"})
    forced = _config(tmp_path, "--config.checkpoint.force_resume=True")
    with Checkpointer(forced) as checkpointer:
        checkpointer.attach(iter(()), total_steps=STEPS, hf_assets={}, data_identity={source: "local:x"})


@pytest.mark.parametrize("hostile", ["../../escaped.txt", "/tmp/jsft-absolute-escape.txt", "sub/dir.json"])
def test_asset_names_from_a_checkpoint_never_leave_their_folder(reference, tmp_path, hostile):
    """A checkpoint's HF asset names become file names on export and chat: only plain names from a fixed
    list are accepted (`../../x` or an absolute path was written outside the folder)."""
    from jsft import export, inference
    from jsft.errors import JsftError

    _copy_run(reference, tmp_path / "run")
    hf_item = tmp_path / "run" / "checkpoints" / str(STEPS) / "hf" / "metadata"  # Orbax's JSON item
    assets = json.loads(hf_item.read_text())
    assets["files"][hostile] = assets["files"]["config.json"]
    hf_item.write_text(json.dumps(assets))
    before = sorted(p.name for p in tmp_path.iterdir())
    for load in (
        lambda: export.convert(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "out")),
        lambda: inference.load(str(tmp_path / "run")),
    ):
        with pytest.raises(JsftError, match=f"the asset file name '{hostile}' is not one jsft carries"):
            load()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not pathlib.Path("/tmp/jsft-absolute-escape.txt").exists()
