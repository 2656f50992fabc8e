"""Run metrics: `<output_dir>/metrics.jsonl` (one JSON object per logged step), the progress bar, and
the same records to TensorBoard and W&B through `jsft.logging_backends`. The hooks that write them are in
`jsft.hooks`."""

from __future__ import annotations

import json
import zlib

import jax
import numpy as np
import tqdm
from etils import epath

from jsft import paths


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
