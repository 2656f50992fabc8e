"""Run metrics: `<output_dir>/metrics.jsonl` (one JSON object per logged step) and the progress bar."""

from __future__ import annotations

import json
import os
import time

import jax
import tqdm


class MetricsLog:
    """Appends metrics lines on process 0 only; other processes keep quiet."""

    def __init__(self, output_dir: str, total_steps: int, initial_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not self.enabled, unit="step")
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._window_positions = 0

    def count_tokens(self, tokens: int, positions: int) -> None:
        """`tokens` of data (padding excluded) in a step that computed over `positions` (rows x length)."""
        self._window_tokens += tokens
        self._window_positions += positions

    def rates(self) -> tuple[float, float]:
        """(tokens, positions) per second since the last call; MFU counts positions, padding included."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        rates = self._window_tokens / elapsed, self._window_positions / elapsed
        self._window_start, self._window_tokens, self._window_positions = now, 0, 0
        return rates

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, steps: int, **postfix) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
