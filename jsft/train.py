"""Supervised fine-tuning, start to finish: `jsft-train --config=configs/<name>.py` runs `run(cfg)`.

config -> processes and mesh -> checkpoints (may the run start here?) -> model description and
tokenizer -> encoded data and the number of steps -> trainer (optimizer, shardings, jitted steps) ->
state (resumed, or loaded from the HF folder) -> hooks (log, eval, samples) -> fit -> final evaluation.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import time

import jax
import ml_collections
import transformers
from etils import epath

from jsft import data, hf, inference, models, runtime, sharding
from jsft.checkpoint import Checkpointer
from jsft.data import sources
from jsft.data.batching import Batching
from jsft.errors import JsftError, SetupError, one_line
from jsft.evaluate import Evaluator, load_tasks
from jsft.hooks import HeldOutLoss, StepLogger, TaskScores, TrainingSamples
from jsft.logging_backends import LogBackends
from jsft.lora import peft
from jsft.lora.spec import LoraSpec
from jsft.metrics import MetricsLog
from jsft.trainer import Trainer

log = logging.getLogger("jsft")


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Trains per `cfg`; returns a summary (losses, steps, wall time, whether it was stopped)."""
    started = time.perf_counter()
    runtime.initialize_distributed(cfg.mesh)
    mesh = sharding.make_mesh(cfg.mesh)
    batching = Batching.from_config(cfg, mesh)
    batching.check_fits()
    epath.Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # local, gs://, s3://
    # May the run start here? Before any heavy work; it holds the folder and the stop signals until the end.
    with Checkpointer(cfg) as checkpointer:
        folder = hf.resolve_model(cfg.model.path, cfg.model.revision or None)  # a Hub id is fetched once
        layout, tokenizer, template = load_model_description(cfg, folder, mesh.devices.flat[0])
        tasks = load_tasks(cfg.log.eval_tasks, "log.eval_tasks") if cfg.log.eval_tasks else []
        train_data, eval_data = load_data(cfg, tokenizer)
        total_steps = count_steps(batching, train_data.examples)
        train_iter = iter(batching.train_batches(train_data.examples))
        assets = hf_assets(folder, tokenizer, template, hf.resolved_revision(cfg.model.path, folder))
        identity = {source: sources.fingerprint(source) for source, *_ in cfg.data.mixer}
        checkpointer.attach(train_iter, total_steps=total_steps, hf_assets=assets, data_identity=identity)
        trainer = Trainer(cfg, layout, mesh, total_steps=total_steps, checkpointer=checkpointer)
        state = trainer.load_state(folder)
        first_step = int(jax.device_get(state.step))

        stats = {"train": train_data.stats} | ({"eval": eval_data.stats} if eval_data is not None else {})
        backends = (
            LogBackends.for_run(cfg, first_step, total_steps, stats) if jax.process_index() == 0 else None
        )
        metrics_log = MetricsLog(cfg.output_dir, total_steps, first_step, backends)
        logger, held_out = add_hooks(
            cfg, trainer, batching, state, tokenizer, template, eval_data, metrics_log
        )
        scores = add_task_scores(cfg, trainer, state, folder, tokenizer, template, tasks, metrics_log)

        try:
            state = trainer.fit(state, train_iter)
        finally:  # the last logged line, even when the run stops on an error
            logger.flush()
            metrics_log.close()
        steps = int(jax.device_get(state.step))
        checkpointer.finish(steps, state)
        if checkpointer.stopped:
            where = checkpointer.directory
            log.info("stop requested: saved step %d in %s; run the same command to continue", steps, where)
        else:
            if held_out and steps not in held_out.losses:
                held_out(state, steps)
            if scores and steps not in scores.scores:
                scores(state, steps)
        summary: dict = {"total_steps": total_steps}
        if held_out:
            summary["eval_loss_start"] = held_out.losses[first_step]
            summary["eval_loss_end"] = held_out.losses[max(held_out.losses)]
        summary.update(steps=steps, stopped=checkpointer.stopped, train_loss=logger.last_loss)
        summary["wall_seconds"] = time.perf_counter() - started
        if backends:
            backends.close()
    done = (steps, total_steps, summary["wall_seconds"], checkpointer.directory)
    log.info("done: step %d of %d in %.1f s; checkpoints in %s", *done)
    return summary


def add_hooks(
    cfg: ml_collections.ConfigDict,
    trainer: Trainer,
    batching: Batching,
    state,
    tokenizer,
    template: str | None,
    eval_data: data.EncodedData | None,
    metrics_log: MetricsLog,
) -> tuple[StepLogger, HeldOutLoss | None]:
    """Registers the run's hooks: log lines, held-out loss and samples (of prompts rendered with `template`).
    The held-out loss and samples are also taken at once, before the first step: a template or EOS mistake
    shows before any training time is spent."""
    first_step = int(jax.device_get(state.step))
    logger = StepLogger.for_run(cfg, trainer, metrics_log)
    trainer.add_hook(logger.count, every=1)
    trainer.add_hook(logger.write, every=cfg.log.every_steps, at_end=True)
    held_out = HeldOutLoss(trainer, batching, eval_data, metrics_log) if eval_data is not None else None
    if held_out:
        held_out(state, first_step)
        if cfg.log.eval_every_steps:
            trainer.add_hook(lambda info: held_out(info.state, info.step), every=cfg.log.eval_every_steps)
    if cfg.log.sample_every_steps:
        samples = TrainingSamples.for_run(cfg, trainer, tokenizer, template, eval_data, metrics_log)
        samples.sample(state, first_step)
        trainer.add_hook(samples, every=cfg.log.sample_every_steps, at_end=True)
    return logger, held_out


def add_task_scores(
    cfg: ml_collections.ConfigDict,
    trainer: Trainer,
    state,
    folder: str,
    tokenizer,
    template: str | None,
    tasks: list,
    metrics_log: MetricsLog,
) -> TaskScores | None:
    """The `log.eval_tasks` hook (None without tasks): scores taken now, every `log.eval_every_steps`
    and at the end, as the held-out loss is. Answers end at the model's EOS tokens, as in jsft-eval."""
    if not tasks:
        return None
    generation = inference.generation_config(folder)
    evaluator = Evaluator(
        trainer.layout,
        trainer.mesh,
        tokenizer,
        stop_ids=inference.eos_ids(tokenizer, hf.read_config(folder), generation),
        chat_template=template,
    )
    scores = TaskScores(evaluator, tasks, metrics_log)
    scores(state, int(jax.device_get(state.step)))
    if cfg.log.eval_every_steps:
        trainer.add_hook(lambda info: scores(info.state, info.step), every=cfg.log.eval_every_steps)
    return scores


def load_model_description(cfg: ml_collections.ConfigDict, folder: str, device: jax.Device):
    """(layout, tokenizer, chat template) of the model folder: its config.json, not its weights.
    `device` (one of the mesh's) decides the "auto" compute dtype and attention backend."""
    compute_dtype = cfg.model.dtype
    if compute_dtype == "auto":  # bfloat16 where the hardware is built for it
        compute_dtype = "float32" if device.platform == "cpu" else "bfloat16"
    model_cfg, _ = models.config_from_folder(
        folder,
        compute_dtype,
        cfg.model.param_dtype,
        cfg.model.attention,
        cfg.model.remat,
        cfg.model.scan_layers,
    )
    hf.check_weights(folder)  # a missing or cut-short weight file fails now, not after encoding
    layout = models.Layout(model_cfg, device=device)
    if cfg.lora.rank and cfg.lora.init_from:  # so does an adapter this run cannot continue
        spec = LoraSpec.from_config(cfg.lora)
        peft.check_peft_folder(
            cfg.lora.init_from, spec, model_cfg.num_layers, cfg.model.path, cfg.lora.init_from_any_base
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:  # an unreadable or corrupt tokenizer file: the environment, not data
        raise SetupError(f"cannot load the tokenizer of {cfg.model.path}: {one_line(e)}") from None
    if len(tokenizer) > model_cfg.vocab_size:
        raise JsftError(
            f"the tokenizer of {cfg.model.path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}: ids past the embedding would train on garbage"
        )
    return layout, tokenizer, data.resolve_template(cfg.data.chat_template)


def load_data(cfg: ml_collections.ConfigDict, tokenizer) -> tuple[data.EncodedData, data.EncodedData | None]:
    """The encoded train mixture and held-out mixture (None without `data.eval_mixer`), cached on disk."""
    train_data = data.prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    log.info(
        "train data: %d conversations, %d tokens, %d trained",
        len(train_data.examples),
        train_data.tokens,
        train_data.trained_tokens,
    )
    if not cfg.data.eval_mixer:
        return train_data, None
    return train_data, data.prepare(cfg.data, tokenizer, seed=cfg.train.seed, mixer=cfg.data.eval_mixer)


def count_steps(batching: Batching, examples) -> int:
    """The run's steps: `train.max_steps`, else epochs x the steps of one epoch."""
    steps_per_epoch = batching.steps_per_epoch(examples)
    total = batching.total_steps(steps_per_epoch)
    log.info(
        "%d steps (%d per epoch), global batch %d %s",
        total,
        steps_per_epoch,
        batching.global_batch_size,
        batching.unit,
    )
    return total


def hf_assets(model_path: str, tokenizer, chat_template: str | None, revision: str = "") -> dict:
    """config.json and the tokenizer files (with the chat template used in training), base64-encoded,
    and the commit the base model was read at (a Hub id's; empty for a local folder): a LoRA export
    merges into that commit's weights, even after the branch it came from has moved."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        hf.check_asset_names(os.listdir(tmp), f"the tokenizer of {model_path}")
        for root in (tmp, model_path):
            for name in ["config.json", "generation_config.json", *os.listdir(tmp)]:
                path = os.path.join(root, name)
                if name not in files and os.path.isfile(path):
                    with open(path, "rb") as f:
                        files[name] = base64.b64encode(f.read()).decode()
    return {"files": files, "revision": revision}


if __name__ == "__main__":  # `python -m jsft.train`: the jsft-train command
    from jsft.cli.train import main

    main()
