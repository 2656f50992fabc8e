"""Supervised fine-tuning, start to finish: `python -m jsft.train --config=configs/<name>.py`.

config -> mesh -> model folder + tokenizer -> encoded, packed data -> optimizer and sharded state
(restored from the latest checkpoint if there is one) -> jitted steps, metrics and checkpoints.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import transformers

from jsft import checkpoint, config, data, metrics, models, optim, sharding, step
from jsft.errors import JsftError

log = logging.getLogger("jsft")


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


def evaluate(eval_step, params, eval_data, cfg, local_batch: int, mesh) -> float:
    """Mean assistant-token loss over the whole held-out set."""
    loss_sum, tokens = 0.0, 0
    for batch in data.batches(
        eval_data.examples,
        batch_size=local_batch,
        max_seq_length=cfg.data.max_seq_length,
        packing=cfg.data.packing,
        seed=cfg.train.seed,
        shuffle=False,
        num_epochs=1,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    ):
        out = jax.device_get(eval_step(params, device_batch(batch, mesh)))
        loss_sum += float(out["loss_sum"])
        tokens += int(out["trained_tokens"])
    return loss_sum / max(tokens, 1)


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Trains per `cfg`; returns the final metrics (train loss, eval losses, timings)."""
    started = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    model_cfg, hf_config = models.config_from_folder(cfg.model.path, cfg.model.dtype, cfg.model.param_dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.path)
    template = data.resolve_template(cfg.data.chat_template)

    encode = dict(
        tokenizer=tokenizer,
        max_seq_length=cfg.data.max_seq_length,
        chat_template=template,
        seed=cfg.train.seed,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    train_data = data.encode_mixture(cfg.data.mixer, **encode)
    eval_data = data.encode_mixture(cfg.data.eval_mixer, **encode) if cfg.data.eval_mixer else None
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
        seed=cfg.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    steps_per_epoch = data.count_batches(train_data.examples, **pipeline_args)
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
    shardings = step.state_shardings(layout, optimizer, mesh)
    train_iter = iter(data.batches(train_data.examples, **pipeline_args))

    mngr = checkpoint.manager(os.path.join(cfg.output_dir, "checkpoints"), keep=cfg.checkpoint.keep)
    resume_step = mngr.latest_step()
    if resume_step is not None:
        log.info("resuming from step %d in %s", resume_step, mngr.directory)
        abstract = jax.eval_shape(lambda p: step.init_state(p, optimizer, shardings), layout.shapes)
        state = checkpoint.restore(mngr, resume_step, abstract, shardings, train_iter)
    else:
        state = step.init_state(models.load_params(cfg.model.path, layout, mesh), optimizer, shardings)
    assets = hf_assets(cfg.model.path, tokenizer, template)
    train_step = step.make_train_step(
        layout,
        optimizer,
        shardings,
        mesh,
        grad_accum_steps=cfg.train.grad_accum_steps,
        loss_reduction=cfg.train.loss_reduction,
    )
    eval_step = step.make_eval_step(layout, shardings["params"], mesh)

    current = int(jax.device_get(state["step"]))
    log_ = metrics.MetricsLog(cfg.output_dir, total_steps, current)
    summary: dict = {"total_steps": total_steps}
    if eval_data is not None:
        summary["eval_loss_start"] = evaluate(eval_step, state["params"], eval_data, cfg, local_batch, mesh)
        log_.write({"step": current, "eval_loss": summary["eval_loss_start"]})
        log.info("held-out loss at step %d: %.4f", current, summary["eval_loss_start"])

    def save(at: int) -> None:
        meta = {"step": at, "total_steps": total_steps, "config": json.loads(cfg.to_json())}
        checkpoint.save(mngr, at, state, train_iter, meta, assets)

    while current < total_steps:
        batch = next(train_iter)
        log_.count_tokens(int(np.count_nonzero(batch["segment_ids"])) * jax.process_count())
        state, step_metrics = train_step(state, device_batch(batch, mesh))
        current += 1
        if current % cfg.log.every_steps == 0 or current == total_steps:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            record = {
                "step": current,
                "loss": values["loss"],
                "lr": float(schedule(current - 1)),
                "grad_norm": values["grad_norm"],
                "trained_tokens": int(values["trained_tokens"]),
                "tokens_per_sec": log_.tokens_per_sec(),
            }
            log_.write(record)
            log_.progress(0, loss=record["loss"], tok_s=record["tokens_per_sec"])
            summary["train_loss"] = record["loss"]
        log_.progress(1)
        if cfg.log.eval_every_steps and eval_data is not None and current % cfg.log.eval_every_steps == 0:
            log_.write(
                {
                    "step": current,
                    "eval_loss": evaluate(eval_step, state["params"], eval_data, cfg, local_batch, mesh),
                }
            )
        if current % cfg.checkpoint.every_steps == 0 and current < total_steps:
            save(current)
    log_.close()
    if mngr.latest_step() != current:
        save(current)
    mngr.wait_until_finished()
    if eval_data is not None:
        summary["eval_loss_end"] = evaluate(eval_step, state["params"], eval_data, cfg, local_batch, mesh)
        log_.write({"step": current, "eval_loss": summary["eval_loss_end"]})
        log.info("held-out loss at step %d: %.4f", current, summary["eval_loss_end"])
    summary["wall_seconds"] = time.perf_counter() - started
    log.info("done: %d steps in %.1f s; checkpoints in %s", current, summary["wall_seconds"], mngr.directory)
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
