"""Orbax checkpoints: one numbered folder per step under `<output_dir>/checkpoints`.

Each step holds the parameters and optimizer state (separate items, so export reads parameters
alone), the Grain iterator state of every process, a JSON `meta` item (step, counters, the run
config) and the Hugging Face assets (config.json, tokenizer files, the chat template used) that make
the step exportable on its own. Orbax writes each step into a temporary folder and renames it when
complete, so a save killed midway never looks like a checkpoint. A complete-looking step that
fails to restore (a truncated file) is moved aside, never deleted, and the previous step is used.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jsft import config, hf, models
from jsft import step as step_lib
from jsft.errors import JsftError, one_line
from jsft.guards import RunLock, StopAgreement, StopSignals
from jsft.lora.spec import LoraSpec

log = logging.getLogger(__name__)


def manager(directory: str, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True
    )
    local = "://" not in directory  # gs:// and other tensorstore URLs pass through unchanged
    return ocp.CheckpointManager(os.path.abspath(directory) if local else directory, options=options)


class Checkpointer:
    """The checkpoints of one training run under `<output_dir>/checkpoints`.

    It decides everything about them: whether the run may start here (checked on construction, before
    any heavy work: `checkpoint.overwrite`, and for a resume the saved config and process count), which
    step to resume from (`checkpoint.step`, else the newest one that restores, moving damaged ones
    aside) after checking its parameter layout, and when to save: every `checkpoint.every_steps`,
    every `checkpoint.every_minutes` (agreed by all processes), on a stop request, and at the end.
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.directory = str(epath.Path(cfg.output_dir) / "checkpoints")
        self.lock = RunLock(cfg.output_dir)
        if jax.process_index() == 0:
            epath.Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # before anything else touches the folder
        self.signals = StopSignals()  # from here on, SIGTERM and Ctrl-C save at the next step boundary
        try:
            if not cfg.checkpoint.resume:
                self._move_previous_run_aside()
            self.mngr = manager(self.directory, keep=cfg.checkpoint.keep)
            self.resuming = cfg.checkpoint.resume and bool(self.mngr.all_steps())
            self._saved_meta: dict = {}  # the resumed step's `meta`, read once here
            if self.resuming:
                self._check_resumable()
        except BaseException:
            self.close()
            raise
        self.stopped = False
        self.data_iter = None
        self._run_meta: dict = {}
        self._hf_assets: dict = {}
        self._agreement: StopAgreement | None = None
        self._last_save = time.monotonic()

    def close(self) -> None:
        """Releases the output folder and the signal handlers (the run is over, whatever its end)."""
        self.signals.close()
        self.lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _move_previous_run_aside(self) -> None:
        directory = epath.Path(self.directory)
        if not (directory.is_dir() and any(directory.iterdir())):
            return
        if not self.cfg.checkpoint.overwrite:
            raise JsftError(
                f"{self.directory} already holds checkpoints; resume with checkpoint.resume=True "
                "or start over with checkpoint.overwrite=True"
            )
        aside = epath.Path(f"{self.directory}.old-{int(time.time())}")
        if jax.process_index() == 0:
            directory.rename(aside)
            metrics_file = epath.Path(self.cfg.output_dir) / "metrics.jsonl"
            if metrics_file.exists():
                metrics_file.rename(aside / "metrics.jsonl")
        multihost_utils.sync_global_devices("jsft-overwrite")
        log.info("checkpoint.overwrite: moved the previous run to %s", aside)

    @property
    def _requested_step(self) -> int:
        return self.cfg.checkpoint.step if self.cfg.checkpoint.step >= 0 else self.mngr.latest_step()

    def _check_resumable(self) -> None:
        """Refuses a resume that would not continue the same run, before anything heavy is loaded.

        A newest step whose metadata is damaged is moved aside for the one before it; resuming an older
        step (`checkpoint.step`) moves the later ones aside, so the run's own result is what stays."""
        meta = self._saved_meta = self._resume_meta()
        requested = self._requested_step
        later = [s for s in self.mngr.all_steps() if s > requested]
        for step in sorted(later):
            aside = self._move_aside(step)
            log.warning("resuming step %d: moved the later step %d to %s", requested, step, aside)
        changes = config.breaking_changes(meta["config"], self.cfg)
        if changes and not self.cfg.checkpoint.force_resume:
            raise JsftError(
                f"the config differs from the one {self.directory} was trained with in {', '.join(changes)}; "
                "resuming would not continue the same run (use a new output_dir, or "
                "checkpoint.force_resume=True)"
            )
        if meta.get("process_count", 1) != jax.process_count():
            raise JsftError(
                f"{self.directory} was written by {meta.get('process_count', 1)} processes and this run has "
                f"{jax.process_count()}: each process's data position is saved separately"
            )

    def _resume_meta(self) -> dict:
        """The `meta` item of the step to resume; damaged newest steps are moved aside on the way."""
        kept = sorted(self.mngr.all_steps())
        requested = self.cfg.checkpoint.step
        if requested >= 0 and requested not in kept:
            raise JsftError(f"checkpoint.step={requested} is not in {self.directory}; kept: {kept}")
        return self._first_readable(
            [requested] if requested >= 0 else kept[::-1],
            lambda step: read_json_item(self.mngr, step, "meta"),
        )

    def _first_readable(self, steps: list[int], read):
        """`read` of the first of `steps` that is not damaged, moving damaged ones aside (never a step the
        user named with `checkpoint.step`); no readable step at all stops the run: a run that silently
        restarted from step 0 would overwrite the record of what was trained."""
        for step in steps:
            try:
                return self._read(step, read)
            except DamagedStep as e:
                if self.cfg.checkpoint.step >= 0:
                    raise JsftError(
                        f"checkpoint step {step} in {self.directory} is damaged ({e}); it was left in place"
                    ) from None
                aside = self._move_aside(step, "corrupt")
                log.warning("checkpoint step %d cannot be restored (%s); moved it to %s", step, e, aside)
        raise JsftError(
            f"no checkpoint in {self.directory} restores (the damaged ones were moved aside); start over "
            "with checkpoint.resume=False or use another output_dir"
        )

    def _read(self, step: int, read):
        """`read(step)`, told apart: a failure that repeats on a second try is damage (DamagedStep); a
        storage error (timeouts, unavailable) is retried and then stops the run in one line, so a passing
        outage never moves a good step aside or restarts the run from step 0."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return read(step)
            except Exception as e:  # Orbax and tensorstore raise many types for damaged files
                error = e
                if not _is_transient(e) and attempt >= 1:
                    raise DamagedStep(_brief(e)) from None
                if attempt < READ_ATTEMPTS - 1:
                    time.sleep(2**attempt * RETRY_SECONDS)
        raise JsftError(
            f"reading checkpoint step {step} in {self.directory} failed {READ_ATTEMPTS} times "
            f"({_brief(error)}); the storage may be unavailable. Nothing was moved: run the same command "
            "again when it is reachable"
        )

    def attach(
        self, data_iter, *, total_steps: int, hf_assets: dict, data_identity: dict | None = None
    ) -> None:
        """What every save writes besides the train state: the data position, the run's length, the
        Hugging Face assets that make each step exportable on its own, and the identity of each training
        source (`sources.fingerprint`). A resume whose data differs from the checkpoint's is refused here,
        before any step: the saved data position means nothing in other data."""
        data_identity = data_identity or {}
        if self.resuming and not self.cfg.checkpoint.force_resume:
            saved = self._saved_meta.get("data", {})
            changed = sorted(s for s in data_identity if s in saved and saved[s] != data_identity[s])
            if changed:
                raise JsftError(
                    f"the data source {changed[0]} differs from the one step {self._requested_step} in "
                    f"{self.directory} was trained on: its data position would point into other rows. Resume "
                    "with the original data, or set checkpoint.force_resume=True"
                )
        self.data_iter = data_iter
        self._run_meta = {
            "total_steps": total_steps,
            "process_count": jax.process_count(),
            "data": data_identity,
        }
        self._hf_assets = hf_assets

    def restore(
        self, abstract: step_lib.TrainState, shardings: step_lib.TrainState
    ) -> step_lib.TrainState | None:
        """The state to resume from (its data position restored into the attached iterator), or None."""
        if not self.resuming:
            return None
        self._check_layout(abstract.params)
        newest_first = sorted(self.mngr.all_steps(), reverse=True)
        steps = [self.cfg.checkpoint.step] if self.cfg.checkpoint.step >= 0 else newest_first
        return self._first_readable(steps, lambda step: self._restore(step, abstract, shardings))

    def _check_layout(self, trainable: dict[str, jax.ShapeDtypeStruct]) -> None:
        """Refuses checkpoints whose trained parameters have other names or shapes than this run's (layers
        scanned or not, LoRA settings, another architecture), even under `checkpoint.force_resume`: they
        cannot restore, and must not be mistaken for damaged steps and moved aside."""
        step_id = self._requested_step
        saved, saved_cfg = saved_layout(self.mngr, step_id)
        saved_lora = LoraSpec.from_config(ml_collections.ConfigDict(saved_cfg["lora"]))
        before = {k: v.shape for k, v in step_lib.trainable_shapes(saved, saved_lora).items()}
        now = {k: v.shape for k, v in trainable.items()}
        if before != now:
            differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise JsftError(
                f"checkpoint step {step_id} in {self.directory} holds parameters laid out differently from "
                f"this run's ({len(differing)} differ, e.g. {differing[0]}: {before.get(differing[0])} "
                f"saved, {now.get(differing[0])} now); model.scan_layers, lora or the architecture changed. "
                "Resume with the checkpoint's settings, or use a new output_dir"
            )

    def _restore(
        self, step: int, abstract: step_lib.TrainState, shardings: step_lib.TrainState
    ) -> step_lib.TrainState:
        restored = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(abstract.params, shardings.params)),
                opt_state=ocp.args.StandardRestore(_abstract(abstract.opt_state, shardings.opt_state)),
                data=grain.checkpoint.CheckpointRestore(self.data_iter),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = restored["meta"]
        log.info("resumed from step %d in %s", step, self.directory)
        return step_lib.TrainState(
            params=restored["params"],
            opt_state=restored["opt_state"],
            step=jax.device_put(jnp.asarray(meta["step"], jnp.int32), shardings.step),
            nonfinite_streak=jax.device_put(
                jnp.asarray(meta.get("nonfinite_streak", 0), jnp.int32), shardings.nonfinite_streak
            ),
        )

    def _move_aside(self, step: int, why: str = "superseded") -> str:
        """Renames a step folder out of the manager's sight (`<why>-<step>-<time>`: kept, never deleted)."""
        source = epath.Path(self.mngr.directory) / str(step)
        target = epath.Path(self.mngr.directory) / f"{why}-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            source.rename(target)
        multihost_utils.sync_global_devices(f"jsft-{why}-{step}")
        self.mngr.reload()
        return str(target)

    def save(self, step: int, state: step_lib.TrainState) -> None:
        """Starts an asynchronous save; arrays are copied off the devices before this returns."""
        meta = dict(
            self._run_meta,
            step=step,
            nonfinite_streak=int(jax.device_get(state.nonfinite_streak)),
            config=json.loads(self.cfg.to_json()),
        )
        with self._saving():
            self._start_save(step, meta, state)
        self._last_save = time.monotonic()

    def _start_save(self, step: int, meta: dict, state: step_lib.TrainState) -> None:
        self.mngr.wait_until_finished()  # the previous save's outcome first: a failure stops the run here
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                data=grain.checkpoint.CheckpointSave(self.data_iter),
                meta=ocp.args.JsonSave(meta),
                hf=ocp.args.JsonSave(self._hf_assets),
            ),
            force=True,
        )

    def after_step(self, step: int, state: step_lib.TrainState) -> bool:
        """Saves if a save is due; True when the run must stop here (a stop request, saved).

        A save that failed in the background (disk full, permissions) stops the run here, one step later,
        in one line; the checkpoints before it are complete and untouched."""
        self._check_saves()
        if self._agreement is None:
            self._agreement = StopAgreement(self.signals)
        minutes = self.cfg.checkpoint.every_minutes
        timed = bool(minutes) and time.monotonic() - self._last_save > 60 * minutes
        stop, save_due = self._agreement(step, timed)
        if stop:
            self._save_unless_nonfinite(step, state)
            self.stopped = True
        elif step < self._run_meta["total_steps"] and (
            step % self.cfg.checkpoint.every_steps == 0 or save_due
        ):
            self._save_unless_nonfinite(step, state)
        return stop

    def _save_unless_nonfinite(self, step: int, state: step_lib.TrainState) -> None:
        """No checkpoint during a non-finite streak: the last good one stays the newest."""
        streak = int(jax.device_get(state.nonfinite_streak))
        if streak:
            log.warning("step %d ends a streak of %d non-finite steps: not saved", step, streak)
            return
        self.save(step, state)

    def _check_saves(self) -> None:
        with self._saving():
            self.mngr.check_for_errors()

    @contextlib.contextmanager
    def _saving(self):
        """A failed save (disk full, permissions, a lost bucket) as one line: Orbax writes each step
        into a temporary folder, so the checkpoints saved before it are complete and untouched."""
        try:
            yield
        except Exception as e:
            raise JsftError(
                f"saving a checkpoint in {self.directory} failed ({_brief(e)}); the run stopped, and the "
                "checkpoints saved before it are intact"
            ) from None

    def finish(self, step: int, state: step_lib.TrainState) -> None:
        """Saves the last step (unless saved already) and waits until every save is on disk."""
        if self.mngr.latest_step() != step:
            self._save_unless_nonfinite(step, state)
        with self._saving():
            self.mngr.wait_until_finished()
            self.mngr.check_for_errors()


READ_ATTEMPTS = 4  # tries of one step's read before a storage error stops the run
RETRY_SECONDS = 1.0  # the first pause between tries; it doubles
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "timed out")


class DamagedStep(Exception):
    """A checkpoint step whose files cannot be read the same way twice: moved aside, never deleted."""


def _is_transient(e: BaseException) -> bool:
    """A storage error that may pass (a timeout, a dropped connection, an unavailable bucket), not a
    property of the files: worth retrying, never a reason to move a step aside."""
    if isinstance(e, (TimeoutError, ConnectionError, InterruptedError, BlockingIOError)):
        return True
    return any(status in str(e) for status in _TRANSIENT_STATUS)


def _brief(e: BaseException) -> str:
    return one_line(e, with_type=True, first_line=True)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_json_item(mngr: ocp.CheckpointManager, step: int, item: str) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def hf_files(mngr: ocp.CheckpointManager, step: int) -> dict[str, bytes]:
    """The Hugging Face assets saved with a step: config.json, tokenizer files, the chat template (plain
    names from `hf.ASSET_FILES` only: they become file names wherever the step is exported or chatted)."""
    files = read_json_item(mngr, step, "hf")["files"]
    hf.check_asset_names(files, f"checkpoint step {step} in {mngr.directory}")
    return {name: base64.b64decode(text) for name, text in files.items()}


def saved_layout(mngr: ocp.CheckpointManager, step: int) -> tuple[models.Layout, dict]:
    """(the parameter layout a step was saved in, the run config): its config.json, parameter dtype,
    layer stacking and LoRA settings, which decide the names and shapes its arrays restore into."""
    hf_config = json.loads(hf_files(mngr, step)["config.json"])
    run_cfg = read_json_item(mngr, step, "meta")["config"]
    cfg = models.ModelConfig.from_hf(
        hf_config,
        param_dtype=models.dtype_of(run_cfg["model"]["param_dtype"]),
        scan_layers=run_cfg["model"].get("scan_layers", False),  # steps saved before the key: unrolled
    )
    lora = LoraSpec.from_config(ml_collections.ConfigDict(run_cfg.get("lora", {"rank": 0})))
    return models.Layout(cfg, lora), run_cfg


def restore_for_export(mngr: ocp.CheckpointManager, step: int, abstract_params: dict, shardings: dict):
    """(params, meta, hf assets) of one step, without the optimizer state or data iterator."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_params, shardings)),
            meta=ocp.args.JsonRestore(),
            hf=ocp.args.JsonRestore(),
        ),
    )
    return restored["params"], restored["meta"], restored["hf"]
