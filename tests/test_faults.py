"""Faults from outside a run: a second run on the same folder, a lock left by a dead process, Ctrl-C.

The checkpoint faults (damaged steps, storage errors, a full disk, resuming an older step) are in
test_resume.py, next to the reference run they compare with.
"""

from __future__ import annotations

import json
import os
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
