"""What keeps a run's work safe from the outside: one run per output folder, and stop signals that save.

`RunLock` refuses a second run on an `output_dir` that a live run holds, before anything heavy starts (two
runs would both write metrics.jsonl and fight over the checkpoints). `StopSignals` turns SIGTERM and
Ctrl-C into a request to save at the next step boundary and exit cleanly; a second Ctrl-C stops at once,
and `StopAgreement` makes every process of a run take that decision at the same step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsft.errors import JsftError

log = logging.getLogger(__name__)

LOCK_NAME = ".jsft-run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """`<output_dir>/.jsft-run.lock`, naming the holder: host, pid and start time.

    A lock left by a dead process on this host (a SIGKILL, a crash) is taken over; one held by a live
    process, or by any process on another host (whose liveness cannot be seen from here), refuses the run.
    Created exclusively on a local disk; on an object store (gs://) the check and the write are two
    steps, so two runs started in the same instant may both pass."""

    def __init__(self, output_dir: str):
        self.path = epath.Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):  # the second try follows a stale lock's removal
            try:
                self._create(json.dumps(record))
                self.held = True
                return
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise JsftError(self._refusal(holder)) from None
                log.warning(
                    "taking over %s from a process that is gone (%s)", self.path, self._describe(holder)
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        raise JsftError(self._refusal(self._holder()))

    def _create(self, text: str) -> None:
        if "://" in str(self.path):
            if self.path.exists():
                raise FileExistsError(str(self.path))
            self.path.write_text(text)
            return
        fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # vanished, or written halfway
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None or holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        return pid == os.getpid() or not _alive(pid)

    @staticmethod
    def _describe(holder: dict | None) -> str:
        if holder is None:
            return "holder unreadable"
        return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"

    def _refusal(self, holder: dict | None) -> str:
        return (
            f"{self.path.parent} is in use by another run ({self._describe(holder)}); wait for it to end or "
            f"use another output_dir (if that run is gone, delete {self.path})"
        )

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


class StopSignals:
    """SIGTERM and SIGINT ask for a stop at the next step boundary, after a save. Installed from the start
    of a run (before encoding and compiling), restored by `close`; only the main thread can install them."""

    def __init__(self):
        self.requested: str | None = None  # the signal's name, once one came
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.requested = signal.Signals(signum).name
        log.warning(
            "%s: the run saves and stops at the next step boundary (Ctrl-C again stops at once, unsaved)",
            self.requested,
        )

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopAgreement:
    """Whether all processes stop (SIGTERM: preemption, scancel, kill) and/or save (a time-based
    checkpoint is due) at the end of a step, decided together.

    With several processes the decisions must agree, or some would enter a checkpoint save the others
    never join: JAX's preemption sync point covers notices that reach the coordination service (TPU
    maintenance events), and a reduction over every process's (SIGTERM seen, save due by its clock)
    covers the rest. That reduction runs on the devices behind the step, and its result is read one
    step later, by when it is done: the host never waits for the running step, so it keeps queueing
    work ahead of the devices. Requests therefore take effect one step after they are seen.
    """

    def __init__(self, signals: StopSignals):
        self.signals = signals
        self._pending: jax.Array | None = None  # the reduction of the previous step's flags
        if jax.process_count() > 1:
            devices = np.array([jax.local_devices(process_index=p) for p in range(jax.process_count())])
            mesh = Mesh(devices, ("process", "local"))
            self._rows = NamedSharding(mesh, P("process"))
            self._any = jax.jit(lambda flags: jnp.any(flags, axis=0), out_shardings=NamedSharding(mesh, P()))

    def __call__(self, step: int, save_due: bool) -> tuple[bool, bool]:
        """(stop, save) for all processes."""
        stop_requested = self.signals.requested is not None
        if jax.process_count() == 1:
            return stop_requested, save_due
        preempted = False
        with contextlib.suppress(RuntimeError):  # RuntimeError: the preemption service is off
            preempted = multihost_utils.reached_preemption_sync_point(step)
        flags = jax.make_array_from_process_local_data(
            self._rows, np.asarray([[stop_requested, save_due]]), (jax.process_count(), 2)
        )
        previous, self._pending = self._pending, self._any(flags)
        if previous is None:
            return preempted, False
        stop, save = np.asarray(jax.device_get(previous))
        return preempted or bool(stop), bool(save)
