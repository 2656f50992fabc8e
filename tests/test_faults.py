"""Faults from outside a run: a second run on the same folder, a lock left by a dead process, Ctrl-C.

The checkpoint faults (damaged steps, storage errors, a full disk, resuming an older step) are in
test_resume.py, next to the reference run they compare with.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from jsft import guards
from jsft.errors import JsftError


def _write_lock(folder, **record) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-03 10:00:00"} | record
    (folder / guards.LOCK_NAME).write_text(json.dumps(holder))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_on_this_host_refuses_the_run_in_one_line(tmp_path, live_pid):
    _write_lock(tmp_path, pid=live_pid)
    with pytest.raises(JsftError) as err:
        guards.RunLock(str(tmp_path)).acquire()
    message = str(err.value)
    assert (
        f"is in use by another run (host {socket.gethostname()}, pid {live_pid}, started 2026-12-03"
        in message
    )
    assert "\n" not in message
    assert json.loads((tmp_path / guards.LOCK_NAME).read_text())["pid"] == live_pid  # not taken


def test_a_holder_on_another_host_refuses_the_run(tmp_path):
    _write_lock(tmp_path, host="other-host", pid=_dead_pid())
    with pytest.raises(JsftError, match="in use by another run \\(host other-host"):
        guards.RunLock(str(tmp_path)).acquire()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    lock = guards.RunLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / guards.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / guards.LOCK_NAME).exists()


def test_the_lock_is_exclusive(tmp_path, live_pid):
    first = guards.RunLock(str(tmp_path))
    first.acquire()
    _write_lock(tmp_path, pid=live_pid)  # as if another live process had won the race
    with pytest.raises(JsftError, match=f"pid {live_pid}"):
        guards.RunLock(str(tmp_path)).acquire()


def test_a_second_run_on_an_output_dir_stops_before_touching_it(tmp_path, live_pid):
    """The Checkpointer takes the lock first: nothing in the folder is read, moved or written."""
    from conftest import tiny_run_args

    from jsft import config
    from jsft.checkpoint import Checkpointer

    _write_lock(tmp_path, pid=live_pid)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cfg = config.load(["prog", *tiny_run_args(tmp_path, 100), "--config.checkpoint.resume=False"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(JsftError, match="is in use by another run"):
        Checkpointer(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_ctrl_c_asks_for_a_stop_and_a_second_one_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    signals = guards.StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM never stops at once: it only asks
        assert signals.requested == "SIGTERM"
    finally:
        signals.close()
    assert signal.getsignal(signal.SIGINT) is previous


# --- exports never destroy what is at --output_dir -------------------------------------------------------


def _tiny_export(tmp_path):
    """(tensors, files) of the tiny model, as `export.write_folder` takes them."""
    from conftest import TINY_MODEL

    from jsft import hf

    tensors = dict(hf.iter_tensors(str(TINY_MODEL)))
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    return tensors, {name: (TINY_MODEL / name).read_bytes() for name in names}


def _an_earlier_export(folder) -> dict[str, bytes]:
    folder.mkdir()
    contents = {
        "README.md": b"my notes",
        "tokenizer.json": b"{}",
        "model-00001-of-00002.safetensors": b"old shard",
        "model-00002-of-00002.safetensors": b"old shard",
    }
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    return contents


def _contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_export_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    from jsft import export

    tensors, files = _tiny_export(tmp_path)
    before = _an_earlier_export(tmp_path / "out")
    with pytest.raises(JsftError, match=r"out is not empty \(4 entries, e.g. README.md\); pass --overwrite"):
        export.write_folder(str(tmp_path / "out"), tensors, files, "# card", "float32")
    assert _contents(tmp_path / "out") == before
    export.write_folder(str(tmp_path / "out"), tensors, files, "# card", "float32", overwrite=True)
    after = _contents(tmp_path / "out")
    assert after["README.md"] == b"# card" and "model-00001-of-00002.safetensors" not in after
    assert "model.safetensors" in after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_a_failed_export_leaves_the_old_folder_as_it_was(tmp_path, monkeypatch):
    """The disk fills up halfway through the weights: the old export was deleted first and the folder
    left without weights; now the new one is written beside it and never put in place."""
    from jsft import export, hf

    tensors, files = _tiny_export(tmp_path)
    before = _an_earlier_export(tmp_path / "out")

    def disk_full(tensors, folder, max_shard_bytes):
        (pathlib.Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_tensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.write_folder(str(tmp_path / "out"), tensors, files, "# card", "float32", overwrite=True)
    assert _contents(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_model_card_names_no_local_folder(tmp_path):
    from jsft import config, export

    cfg = json.loads(config.default_config().to_json())
    cfg["model"]["path"] = str(tmp_path / "private" / "base-model")
    cfg["output_dir"] = "/home/someone/runs/x"
    cfg["data"]["mixer"] = [[str(tmp_path / "secret.jsonl"), 1.0], ["allenai/tulu-3-sft-mixture", 1.0]]
    card = export.model_card(cfg, 10, 10)
    assert str(tmp_path) not in card and "/home/someone" not in card
    assert "`base-model`" in card and "secret.jsonl" in card and "allenai/tulu-3-sft-mixture" in card


# --- model and adapter folders are checked before any data is encoded ----------------------------------


@pytest.fixture
def model_folder(tmp_path):
    from conftest import make_hf_llama

    return make_hf_llama(tmp_path / "model")


def test_a_config_json_that_is_not_json_or_lacks_a_key_is_one_line(model_folder):
    from jsft import models

    config_file = model_folder / "config.json"
    good = json.loads(config_file.read_text())
    config_file.write_text('{"model_type": "llama",')
    with pytest.raises(JsftError, match=rf"^{config_file} is not valid JSON \(Expecting"):
        models.config_from_folder(str(model_folder))
    config_file.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(JsftError, match=r"config.json lacks the key 'hidden_size'$"):
        models.config_from_folder(str(model_folder))


def test_a_weight_file_cut_short_stops_the_run_before_encoding(model_folder):
    import jax

    from jsft import config, train

    weights = model_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = config.default_config()
    cfg.model.path = str(model_folder)
    with pytest.raises(
        JsftError, match=rf"^{weights} is cut short: it holds \d+ bytes of the \d+ its tensors"
    ):
        train.load_model_description(cfg, str(model_folder), jax.devices()[0])


def _adapter(folder, base: str):
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 16.0, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base}))
    save_file({"x": np.zeros(3, np.float32)}, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_an_adapter_of_another_base_model_is_refused_unless_forced(tmp_path, model_folder):
    from jsft import config
    from jsft.lora import peft
    from jsft.lora.spec import LoraSpec

    lora = config.default_config().lora
    lora.rank = 4
    spec = LoraSpec.from_config(lora)
    mine = _adapter(tmp_path / "mine", str(model_folder))
    peft.check_peft_folder(mine, spec, 2, str(model_folder), any_base=False)
    other = _adapter(tmp_path / "other", "org/another-model")
    with pytest.raises(JsftError, match="was trained on org/another-model, and this run's model.path is"):
        peft.check_peft_folder(other, spec, 2, str(model_folder), any_base=False)
    peft.check_peft_folder(other, spec, 2, str(model_folder), any_base=True)
    cut = pathlib.Path(mine) / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:-4])
    with pytest.raises(JsftError, match="adapter_model.safetensors is cut short"):
        peft.check_peft_folder(mine, spec, 2, str(model_folder), any_base=False)


# --- every command ends in one line ---------------------------------------------------------------------


def test_commands_end_faults_of_the_environment_in_one_line(monkeypatch):
    from jsft.cli import command

    def disk_full(argv):
        raise OSError(28, "No space left on device")

    with pytest.raises(SystemExit) as ended:
        command("jsft.x")(disk_full)([])
    assert str(ended.value) == (
        "jsft.x: failed: OSError: [Errno 28] No space left on device (--debug or JSFT_DEBUG=1 shows where)"
    )
    with pytest.raises(OSError):  # --debug: the traceback
        command("jsft.x")(disk_full)(["--debug"])

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ended:
        command("jsft.x")(interrupted)([])
    assert ended.value.code == 130


# --- one hostile row is one counted drop ----------------------------------------------------------------


def test_a_row_nested_too_deep_or_too_long_is_a_counted_drop(tmp_path):
    """A row nested thousands of levels deep was a RecursionError traceback; an 8 MB row took 34 s to
    encode. Both are drops counted by reason, and the long one costs no rendering time."""
    import time

    import transformers
    from conftest import TINY_MODEL

    from jsft.data import preprocess

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = {"messages": [{"role": "user", "content": "x" * 3_000_000}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good), deep, json.dumps(huge), json.dumps(good)]) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    started = time.perf_counter()
    encoded = preprocess.encode_mixture(((str(path), 1.0),), tokenizer, 64, None, 0, 0.6, num_proc=1)
    assert time.perf_counter() - started < 20
    assert len(encoded) == 2
    assert encoded.stats["drops"] == {"too_deep": 1, "over_max_row_chars": 1}
