"""The hooks a run registers with its trainer (`trainer.add_hook`): the training log's lines, the
held-out loss, scored tasks (`log.eval_tasks`) and greedy samples of a few prompts, each written to the
run's metrics log."""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np
import optax
from transformers import PreTrainedTokenizerBase

from jsft import flops, sharding
from jsft.data import EncodedData
from jsft.data.batching import Batching
from jsft.evaluate import Evaluator, Task, without_records
from jsft.generate import Generator, Sampling
from jsft.metrics import MetricsLog, batch_fingerprint
from jsft.step import ROUTER_METRICS, TrainState
from jsft.trainer import StepInfo, Trainer

log = logging.getLogger("jsft")

HELD_OUT_SAMPLES = 3  # held-out conversations sampled when log.sample_prompts is empty


class StepLogger:
    """The training log's two hooks: `count` after every step (progress, tokens seen) and `write` on
    logged steps (one metrics line: loss, lr, grad norm, token rates, MFU where the peak is known)."""

    def __init__(
        self,
        metrics_log: MetricsLog,
        schedule: optax.Schedule,
        *,
        flops_per_token: float,
        peak_flops: float | None,
        row_groups: int = 1,
    ):
        self.log, self.schedule = metrics_log, schedule
        self._row_groups = row_groups  # processes that load distinct rows (`sharding.row_groups`)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.last_loss: float | None = None
        self._pending: tuple[StepInfo, float, float] | None = None
        self._window_start = time.perf_counter()
        self._window_tokens = self._window_positions = 0

    @classmethod
    def for_run(cls, cfg, trainer, metrics_log: MetricsLog) -> StepLogger:
        """The logger of a run (MFU as `flops.MFU_DEFINITION`: causal attention, every position a step
        computes, padding included; the same as the roofline of `jsft.planning`)."""
        return cls(
            metrics_log,
            trainer.schedule,
            flops_per_token=flops.mfu_flops_per_token(trainer.layout.cfg, cfg.data.max_seq_length),
            peak_flops=flops.device_peak_flops(override=cfg.log.peak_flops or None),
            row_groups=sharding.row_groups(trainer.mesh)[1],
        )

    def count(self, info: StepInfo) -> None:
        """Data tokens (padding excluded) of every process; MFU counts all positions, padding included.

        Also writes the line queued at an earlier step: this step is queued by now, so fetching the
        earlier step's metrics does not leave the devices idle."""
        self._window_tokens += int(np.count_nonzero(info.batch["segment_ids"])) * self._row_groups
        self._window_positions += info.batch["segment_ids"].size * self._row_groups
        self.log.progress(1)
        if self._pending is not None and self._pending[0].step < info.step:
            self.flush()

    def _rates(self) -> tuple[float, float]:
        """(tokens, positions) per second since the last logged step."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        rates = self._window_tokens / elapsed, self._window_positions / elapsed
        self._window_start, self._window_tokens, self._window_positions = now, 0, 0
        return rates

    def write(self, info: StepInfo) -> None:
        """Queues the step's line (its rates measured now); it is written once the next step is queued,
        or by `flush` at the end of the run."""
        self.flush()
        self._pending = (info, *self._rates())

    def flush(self) -> None:
        """Writes the queued line, if any (waits for its step's metrics)."""
        if self._pending is None:
            return
        (info, tokens_per_sec, positions_per_sec), self._pending = self._pending, None
        values = jax.device_get(info.metrics)
        record = {
            "step": info.step,
            "loss": float(values["loss"]),
            "lr": float(self.schedule(info.step - 1)),
            "grad_norm": float(values["grad_norm"]),
            "trained_tokens": int(values["trained_tokens"]),
            "tokens_per_sec": tokens_per_sec,
            "batch_fingerprint": batch_fingerprint(info.batch),
        }
        # a mixture of experts: the router losses and the experts' loads (1 = balanced)
        record |= {k: float(values[k]) for k in ROUTER_METRICS.values() if k in values}
        if self.peak_flops:
            per_device = positions_per_sec / jax.device_count()
            record["mfu"] = flops.mfu(per_device, self.flops_per_token, self.peak_flops)
        if values["skipped"]:
            record["skipped_nonfinite"] = True
        self.log.write(record)
        shown = {"loss": record["loss"], "lr": record["lr"], "tok_s": tokens_per_sec}
        self.log.progress(0, **shown, **({"mfu": record["mfu"]} if "mfu" in record else {}))
        self.last_loss = record["loss"]


class HeldOutLoss:
    """The held-out set's mean trained-token loss, written to the metrics log at each evaluation."""

    def __init__(self, trainer: Trainer, batching: Batching, eval_data: EncodedData, metrics_log: MetricsLog):
        self.trainer, self.batching, self.metrics_log = trainer, batching, metrics_log
        self.examples = eval_data.examples
        self.losses: dict[int, float] = {}

    def __call__(self, state, step: int) -> float:
        self.losses[step] = self.trainer.evaluate(state, self.batching.eval_batches(self.examples))
        self.metrics_log.write({"step": step, "eval_loss": self.losses[step]})
        log.info("held-out loss at step %d: %.4f", step, self.losses[step])
        return self.losses[step]


class TaskScores:
    """The `log.eval_tasks` hook: each task scored with the current weights (`jsft.evaluate`, the same
    scores as `python -m jsft.eval` on the saved step), written as one `scores` record of the step."""

    def __init__(self, evaluator: Evaluator, tasks: list[Task], metrics_log: MetricsLog):
        self.evaluator, self.tasks, self.metrics_log = evaluator, tasks, metrics_log
        self.scores: dict[int, dict] = {}

    def __call__(self, state: TrainState, step: int) -> dict:
        scores = without_records(self.evaluator.score(state.params, state.base, self.tasks))
        self.scores[step] = scores
        self.metrics_log.write({"step": step, "scores": scores})
        shown = ", ".join(
            f"{task} {k} {v:.3f}" for task, s in scores.items() for k, v in s.items() if k != "count"
        )
        log.info("scores at step %d: %s", step, shown)
        return scores


class TrainingSamples:
    """The `log.sample_every_steps` hook: greedy completions of a few fixed prompts with the current
    weights, written to the metrics log (and from there to TensorBoard and W&B) as one record."""

    def __init__(
        self,
        trainer: Trainer,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[tuple[list[int], str | None]],
        metrics_log: MetricsLog,
        max_new_tokens: int,
    ):
        self.generator = Generator(trainer.layout, trainer.mesh)
        self.tokenizer, self.metrics_log = tokenizer, metrics_log
        self.prompt_ids = [ids for ids, _ in prompts]
        self.references = [reference for _, reference in prompts]
        eos = tokenizer.eos_token_id
        self.sampling = Sampling(
            max_new_tokens, stop_ids=() if eos is None else (eos,), pad_id=tokenizer.pad_token_id or 0
        )
        self.seconds: list[float] = []

    @classmethod
    def for_run(
        cls,
        cfg: ml_collections.ConfigDict,
        trainer: Trainer,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None,
        eval_data: EncodedData | None,
        metrics_log: MetricsLog,
    ) -> TrainingSamples:
        """Prompts from `log.sample_prompts` (user messages, rendered with the run's chat template), else
        the first held-out conversations up to their last assistant turn, which becomes the reference."""
        if cfg.log.sample_prompts:
            prompts = [
                (_render(tokenizer, [{"role": "user", "content": text}], chat_template), None)
                for text in cfg.log.sample_prompts
            ]
        else:
            prompts = [
                _held_out_prompt(tokenizer, eval_data, i)
                for i in range(min(HELD_OUT_SAMPLES, len(eval_data)))
            ]
        return cls(trainer, tokenizer, prompts, metrics_log, cfg.log.sample_max_new_tokens)

    def __call__(self, info: StepInfo) -> None:
        self.sample(info.state, info.step)

    def sample(self, state: TrainState, step: int) -> None:
        """Completes the prompts with `state`'s weights and writes them as the record of `step`."""
        started = time.perf_counter()
        out = self.generator.generate(state.params, self.prompt_ids, self.sampling, base=state.base)
        self.seconds.append(time.perf_counter() - started)
        samples = []
        for ids, tokens, reference in zip(self.prompt_ids, out.tokens, self.references, strict=True):
            if tokens and tokens[-1] in self.sampling.stop_ids:
                tokens = tokens[:-1]
            sample = {"prompt": self.tokenizer.decode(ids), "completion": self.tokenizer.decode(tokens)}
            samples.append(sample if reference is None else sample | {"reference": reference})
        self.metrics_log.write({"step": step, "samples": samples, "sample_seconds": self.seconds[-1]})


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_template: str | None) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=True, return_dict=True
    )
    return list(rendered["input_ids"])


def _held_out_prompt(
    tokenizer: PreTrainedTokenizerBase, encoded: EncodedData, index: int
) -> tuple[list[int], str]:
    """(the tokens before row `index`'s last trained span, that span's text): a prompt and its answer."""
    start, end = int(encoded.row_starts[index]), int(encoded.row_starts[index + 1])
    tokens, trained = encoded.token_ids[start:end], encoded.trained[start:end].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained, [0]])))  # starts and ends of trained runs
    first, last = int(edges[-2]), int(edges[-1])
    return tokens[:first].tolist(), tokenizer.decode(tokens[first:last], skip_special_tokens=True).strip()
