"""Supervised fine-tuning, start to finish: `python -m jsft.train --config=configs/<name>.py`.

config -> processes and mesh -> checkpoints to resume from -> model folder + tokenizer -> encoded,
packed data -> optimizer and sharded state (restored, or loaded from the HF folder) -> jitted steps,
with metrics, held-out evaluation and checkpoints, until the last step or a stop signal.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsft import checkpoint, config, data, flops, models, optim, sharding, step
from jsft.errors import JsftError
from jsft.lora import LoraSpec
from jsft.metrics import MetricsLog

log = logging.getLogger("jsft")


def initialize_distributed(mesh_cfg: ml_collections.ConfigDict) -> None:
    """Joins a multi-process run: explicit coordinator from the config, else SLURM/TPU auto-detection."""
    if mesh_cfg.num_processes > 1:
        # CPU processes need a collectives backend; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(mesh_cfg.coordinator_address, mesh_cfg.num_processes, mesh_cfg.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


class StepBoundary:
    """What all processes do at the end of a step: stop (SIGTERM: preemption, scancel, kill) and/or
    save (a time-based checkpoint is due), decided together.

    With several processes the decisions must agree, or some would enter a checkpoint save the others
    never join: JAX's preemption sync point covers notices that reach the coordination service (TPU
    maintenance events), and a reduction over every process's (SIGTERM seen, save due by its clock)
    covers the rest. That reduction runs on the devices behind the step, and its result is read one
    step later, by when it is done: the host never waits for the running step, so it keeps queueing
    work ahead of the devices. Requests therefore take effect one step after they are seen.
    """

    def __init__(self):
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._handle)
        self._pending: jax.Array | None = None  # the reduction of the previous step's flags
        if jax.process_count() > 1:
            devices = np.array([jax.local_devices(process_index=p) for p in range(jax.process_count())])
            mesh = Mesh(devices, ("process", "local"))
            self._rows = NamedSharding(mesh, P("process"))
            self._any = jax.jit(lambda flags: jnp.any(flags, axis=0), out_shardings=NamedSharding(mesh, P()))

    def _handle(self, signum, frame) -> None:
        self.stop_requested = True

    def __call__(self, step: int, save_due: bool) -> tuple[bool, bool]:
        """(stop, save) for all processes."""
        if jax.process_count() == 1:
            return self.stop_requested, save_due
        preempted = False
        with contextlib.suppress(RuntimeError):  # RuntimeError: the preemption service is off
            preempted = multihost_utils.reached_preemption_sync_point(step)
        flags = jax.make_array_from_process_local_data(
            self._rows, np.asarray([[self.stop_requested, save_due]]), (jax.process_count(), 2)
        )
        previous, self._pending = self._pending, self._any(flags)
        if previous is None:
            return preempted, False
        stop, save = np.asarray(jax.device_get(previous))
        return preempted or bool(stop), bool(save)


def open_checkpoints(cfg: ml_collections.ConfigDict):
    """The checkpoint manager and the step to resume from (None = start fresh), checked before heavy work."""
    directory = os.path.join(cfg.output_dir, "checkpoints")
    if not cfg.checkpoint.resume and os.path.isdir(directory) and os.listdir(directory):
        if not cfg.checkpoint.overwrite:
            raise JsftError(
                f"{directory} already holds checkpoints; resume with checkpoint.resume=True "
                "or start over with checkpoint.overwrite=True"
            )
        aside = f"{directory}.old-{int(time.time())}"
        if jax.process_index() == 0:
            os.rename(directory, aside)
            metrics_file = os.path.join(cfg.output_dir, "metrics.jsonl")
            if os.path.exists(metrics_file):
                os.rename(metrics_file, f"{aside}/metrics.jsonl")
        multihost_utils.sync_global_devices("jsft-overwrite")
        log.info("checkpoint.overwrite: moved the previous run to %s", aside)
    mngr = checkpoint.manager(directory, keep=cfg.checkpoint.keep)
    if not cfg.checkpoint.resume or not mngr.all_steps():
        return mngr, None
    latest = cfg.checkpoint.step if cfg.checkpoint.step >= 0 else max(mngr.all_steps())
    if latest not in mngr.all_steps():
        raise JsftError(f"checkpoint.step={latest} is not in {directory}; kept: {sorted(mngr.all_steps())}")
    meta = checkpoint.read_json_item(mngr, latest, "meta")
    changes = config.breaking_changes(meta["config"], cfg)
    if changes and not cfg.checkpoint.force_resume:
        details = ", ".join(f"{k}" for k in changes)
        raise JsftError(
            f"the config differs from the one {directory} was trained with in {details}; resuming would not "
            "continue the same run (use a new output_dir, or checkpoint.force_resume=True)"
        )
    if meta.get("process_count", 1) != jax.process_count():
        raise JsftError(
            f"{directory} was written by {meta.get('process_count', 1)} processes and this run has "
            f"{jax.process_count()}: each process's data position is saved separately"
        )
    return mngr, (cfg.checkpoint.step if cfg.checkpoint.step >= 0 else None)


def check_saved_layout(mngr, layout: models.Layout, lora: LoraSpec | None) -> None:
    """Refuses checkpoints whose trained parameters have other names or shapes than this run's (layers
    scanned or not, LoRA settings, another architecture), even under `checkpoint.force_resume`: they
    cannot restore, and must not be mistaken for damaged steps and moved aside."""
    step_id = mngr.latest_step()
    saved, saved_cfg = checkpoint.saved_layout(mngr, step_id)
    saved_lora = LoraSpec.from_config(ml_collections.ConfigDict(saved_cfg["lora"]))
    before = {k: v.shape for k, v in step.trainable_shapes(saved, saved_lora).items()}
    now = {k: v.shape for k, v in step.trainable_shapes(layout, lora).items()}
    if before != now:
        differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise JsftError(
            f"checkpoint step {step_id} in {mngr.directory} holds parameters laid out differently from this "
            f"run's ({len(differing)} differ, e.g. {differing[0]}: {before.get(differing[0])} saved, "
            f"{now.get(differing[0])} now); model.scan_layers, lora or the architecture changed. Resume "
            "with the checkpoint's settings, or use a new output_dir"
        )


def hf_assets(model_path: str, tokenizer, chat_template: str | None) -> dict:
    """config.json and the tokenizer files (with the chat template used in training), base64-encoded."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for root in (tmp, model_path):
            for name in ["config.json", "generation_config.json", *os.listdir(tmp)]:
                path = os.path.join(root, name)
                if name not in files and os.path.isfile(path):
                    with open(path, "rb") as f:
                        files[name] = base64.b64encode(f.read()).decode()
    return {"files": files}


def device_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch, assembled into global arrays."""
    spec = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(spec, v) for k, v in batch.items()}


def fingerprint(batch: dict[str, np.ndarray]) -> int:
    """A checksum of this process's batch, logged so resumed runs can be checked for skipped data."""
    return zlib.crc32(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch)))


def evaluate(eval_step, state: dict, examples, cfg, local_batch: int, mesh) -> float:
    """Mean assistant-token loss over the whole held-out set."""
    loss_sum, tokens = 0.0, 0
    for batch in data.batches(
        examples,
        batch_size=local_batch,
        max_seq_length=cfg.data.max_seq_length,
        packing=cfg.data.packing,
        packer=cfg.data.packer,
        seed=cfg.train.seed,
        shuffle=False,
        num_epochs=1,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    ):
        out = jax.device_get(eval_step(state["params"], state.get("base"), device_batch(batch, mesh)))
        loss_sum += float(out["loss_sum"])
        tokens += int(out["trained_tokens"])
    return loss_sum / max(tokens, 1)


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Trains per `cfg`; returns a summary (losses, steps, wall time, whether it was stopped)."""
    started = time.perf_counter()
    initialize_distributed(cfg.mesh)
    mesh = sharding.make_mesh(cfg.mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_batch = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    if micro_batch % batch_shards or cfg.train.global_batch_size % jax.process_count():
        raise JsftError(
            f"train.global_batch_size={cfg.train.global_batch_size} / grad_accum_steps="
            f"{cfg.train.grad_accum_steps} must split evenly over data x fsdp = {batch_shards} devices "
            f"and {jax.process_count()} processes"
        )
    os.makedirs(cfg.output_dir, exist_ok=True)
    mngr, resume_step = open_checkpoints(cfg)
    resuming = bool(mngr.all_steps()) and cfg.checkpoint.resume
    compute_dtype = cfg.model.dtype
    if compute_dtype == "auto":  # bfloat16 where the hardware is built for it
        compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model_cfg, hf_config = models.config_from_folder(
        cfg.model.path,
        compute_dtype,
        cfg.model.param_dtype,
        cfg.model.attention,
        cfg.model.remat,
        cfg.model.scan_layers,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.path)
    template = data.resolve_template(cfg.data.chat_template)
    if len(tokenizer) > model_cfg.vocab_size:
        raise JsftError(
            f"the tokenizer of {cfg.model.path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}: ids past the embedding would train on garbage"
        )

    train_data = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    eval_data = (
        data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, mixer=cfg.data.eval_mixer)
        if cfg.data.eval_mixer
        else None
    )
    log.info(
        "train data: %d conversations, %d tokens, %d trained",
        len(train_data.examples),
        train_data.tokens,
        train_data.trained_tokens,
    )

    local_batch = cfg.train.global_batch_size // jax.process_count()
    pipeline_args = dict(
        batch_size=local_batch,
        max_seq_length=cfg.data.max_seq_length,
        packing=cfg.data.packing,
        packer=cfg.data.packer,
        seed=cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    steps_per_epoch = int(
        np.min(
            multihost_utils.process_allgather(
                np.asarray(data.count_batches(train_data.examples, **pipeline_args))
            )
        )
    )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    log.info(
        "%d steps (%d per epoch), global batch %d rows",
        total_steps,
        steps_per_epoch,
        cfg.train.global_batch_size,
    )

    optimizer = optim.make_optimizer(cfg.optim, total_steps)
    schedule = optim.make_schedule(cfg.optim, total_steps)
    layout = models.Layout(model_cfg, hf_config["model_type"])
    lora = LoraSpec.from_config(cfg.lora)
    shardings = step.state_shardings(layout, optimizer, mesh, lora)
    train_iter = iter(data.batches(train_data.examples, **pipeline_args))

    state = None
    if resuming:
        check_saved_layout(mngr, layout, lora)
        trainable = step.trainable_shapes(layout, lora)
        abstract = jax.eval_shape(lambda p: step.init_state(p, optimizer, shardings), trainable)
        restored_step, state = checkpoint.restore_latest_good(
            mngr, abstract, shardings, train_iter, resume_step
        )
        if state is not None:
            log.info("resumed from step %d in %s", restored_step, mngr.directory)
    weights = models.load_params(cfg.model.path, layout, mesh) if state is None or lora else None
    if state is None:
        params = lora.init(cfg.train.seed, layout, mesh) if lora else weights
        state = step.init_state(params, optimizer, shardings, base=weights if lora else None)
    elif lora:
        state["base"] = weights  # LoRA checkpoints hold only the factors; the base is the model folder
    assets = hf_assets(cfg.model.path, tokenizer, template)
    train_step = step.make_train_step(
        layout,
        optimizer,
        shardings,
        mesh,
        grad_accum_steps=cfg.train.grad_accum_steps,
        loss_reduction=cfg.train.loss_reduction,
        z_loss=cfg.train.z_loss,
        lora=lora,
    )
    eval_step = step.make_eval_step(layout, shardings, mesh, lora)

    flops_per_token = flops.flops_per_token(model_cfg, cfg.data.max_seq_length)
    peak = flops.device_peak_flops(override=cfg.log.peak_flops or None)
    current = int(jax.device_get(state["step"]))
    metrics_log = MetricsLog(cfg.output_dir, total_steps, current)
    summary: dict = {"total_steps": total_steps, "stopped": False}

    def run_eval() -> float:
        value = evaluate(eval_step, state, eval_data.examples, cfg, local_batch, mesh)
        metrics_log.write({"step": current, "eval_loss": value})
        log.info("held-out loss at step %d: %.4f", current, value)
        return value

    last_save = time.monotonic()

    def save() -> None:
        nonlocal last_save
        meta = {
            "total_steps": total_steps,
            "process_count": jax.process_count(),
            "config": json.loads(cfg.to_json()),
        }
        checkpoint.save(mngr, current, state, train_iter, meta, assets)
        last_save = time.monotonic()

    if eval_data is not None:
        summary["eval_loss_start"] = run_eval()
    boundary = StepBoundary()
    while current < total_steps:
        batch = next(train_iter)
        metrics_log.count_tokens(
            int(np.count_nonzero(batch["segment_ids"])) * jax.process_count(),
            cfg.train.global_batch_size * cfg.data.max_seq_length,
        )
        batch_id = fingerprint(batch)
        state, step_metrics = train_step(state, device_batch(batch, mesh))
        current += 1
        if current % cfg.log.every_steps == 0 or current == total_steps:
            values = jax.device_get(step_metrics)
            tokens_per_sec, positions_per_sec = metrics_log.rates()
            record = {
                "step": current,
                "loss": float(values["loss"]),
                "lr": float(schedule(current - 1)),
                "grad_norm": float(values["grad_norm"]),
                "trained_tokens": int(values["trained_tokens"]),
                "tokens_per_sec": tokens_per_sec,
                "batch_fingerprint": batch_id,
            }
            if peak:
                record["mfu"] = flops.mfu(positions_per_sec / jax.device_count(), flops_per_token, peak)
            if values["skipped"]:
                record["skipped_nonfinite"] = True
            metrics_log.write(record)
            metrics_log.progress(0, loss=record["loss"], tok_s=record["tokens_per_sec"])
            summary["train_loss"] = record["loss"]
            streak = int(jax.device_get(state["nonfinite_streak"]))
            if streak >= cfg.train.max_nonfinite_steps:
                raise JsftError(
                    f"{streak} steps in a row had a non-finite loss or gradient (up to step {current}); "
                    "stopped. "
                    f"The last good checkpoint is step {mngr.latest_step()} in {mngr.directory}"
                )
        metrics_log.progress(1)
        if cfg.log.eval_every_steps and eval_data is not None and current % cfg.log.eval_every_steps == 0:
            summary["eval_loss_end"] = run_eval()
        minutes = cfg.checkpoint.every_minutes
        stop, save_due = boundary(current, bool(minutes) and time.monotonic() - last_save > 60 * minutes)
        if stop:
            save()
            summary["stopped"] = True
            break
        if current < total_steps and (current % cfg.checkpoint.every_steps == 0 or save_due):
            save()
    metrics_log.close()
    if mngr.latest_step() != current:
        save()
    mngr.wait_until_finished()
    if summary["stopped"]:
        log.info(
            "stop requested: saved step %d in %s; run the same command to continue", current, mngr.directory
        )
    elif eval_data is not None and not (cfg.log.eval_every_steps and current % cfg.log.eval_every_steps == 0):
        summary["eval_loss_end"] = run_eval()
    summary["steps"] = current
    summary["wall_seconds"] = time.perf_counter() - started
    log.info(
        "done: step %d of %d in %.1f s; checkpoints in %s",
        current,
        total_steps,
        summary["wall_seconds"],
        mngr.directory,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    for noisy in ("absl", "jax", "orbax", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = config.load_or_exit(argv)
    try:
        run(cfg)
    except JsftError as e:
        sys.exit(f"jsft: error: {e}")


if __name__ == "__main__":
    main()
