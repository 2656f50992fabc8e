"""Run metrics: `<output_dir>/metrics.jsonl` (one JSON object per logged step), the progress bar, and
the same records to TensorBoard and W&B through `jsft.logging_backends`."""

from __future__ import annotations

import json
import time
import zlib

import jax
import numpy as np
import optax
import tqdm
from etils import epath

from jsft import flops, paths
from jsft.trainer import StepInfo


class MetricsLog:
    """Appends metrics lines on process 0 only (and hands each to `backends`); other processes keep quiet."""

    def __init__(self, output_dir: str, total_steps: int, initial_step: int = 0, backends=None):
        self.enabled = jax.process_index() == 0
        self.path = str(epath.Path(output_dir) / "metrics.jsonl")
        self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not self.enabled, unit="step")
        self.backends = backends if self.enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        paths.append_text(self.path, json.dumps(record) + "\n")
        if self.backends:
            self.backends.record(record)

    def progress(self, steps: int, **postfix) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.backends:  # flushed, not closed: the run's final evaluation is written after this
            self.backends.flush()


def batch_fingerprint(batch: dict[str, np.ndarray]) -> int:
    """A checksum of this process's batch, logged so resumed runs can be checked for skipped data."""
    return zlib.crc32(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch)))


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
    ):
        self.log, self.schedule = metrics_log, schedule
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.last_loss: float | None = None
        self._pending: tuple[StepInfo, float, float] | None = None
        self._window_start = time.perf_counter()
        self._window_tokens = self._window_positions = 0

    @classmethod
    def for_run(cls, cfg, trainer, metrics_log: MetricsLog) -> StepLogger:
        """The logger of a run (MFU as `flops.MFU_DEFINITION`: causal attention, every position a step
        computes, padding included; the same as the roofline of `jsft.tpu`)."""
        return cls(
            metrics_log,
            trainer.schedule,
            flops_per_token=flops.mfu_flops_per_token(trainer.layout.cfg, cfg.data.max_seq_length),
            peak_flops=flops.device_peak_flops(override=cfg.log.peak_flops or None),
        )

    def count(self, info: StepInfo) -> None:
        """Data tokens (padding excluded) of every process; MFU counts all positions, padding included.

        Also writes the line queued at an earlier step: this step is queued by now, so fetching the
        earlier step's metrics does not leave the devices idle."""
        self._window_tokens += int(np.count_nonzero(info.batch["segment_ids"])) * jax.process_count()
        self._window_positions += info.batch["segment_ids"].size * jax.process_count()
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
        if self.peak_flops:
            per_device = positions_per_sec / jax.device_count()
            record["mfu"] = flops.mfu(per_device, self.flops_per_token, self.peak_flops)
        if values["skipped"]:
            record["skipped_nonfinite"] = True
        self.log.write(record)
        shown = {"loss": record["loss"], "lr": record["lr"], "tok_s": tokens_per_sec}
        self.log.progress(0, **shown, **({"mfu": record["mfu"]} if "mfu" in record else {}))
        self.last_loss = record["loss"]
