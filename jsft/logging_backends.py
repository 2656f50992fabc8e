"""Where a run's metrics go besides `metrics.jsonl`: TensorBoard always, Weights & Biases on request.

`LogBackends` takes the same records the metrics log writes (train lines, `eval_loss` lines, sample
lines) and turns them into TensorBoard scalars and text under `<output_dir>/tensorboard`, and into a
W&B run when `log.wandb_project` is set. TensorBoard files are written with tensorboard's own event
writer and protobufs, so TensorFlow is not needed; on an object store they are written locally and
copied up at each flush. Only process 0 logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
import time

from etils import epath

from jsft import paths
from jsft.errors import JsftError

# metrics.jsonl key -> chart name (TensorBoard tag, W&B key)
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "aux_loss": "train/aux_loss",
    "router_z_loss": "train/router_z_loss",
    "expert_load_max": "train/expert_load_max",
    "expert_load_min": "train/expert_load_min",
    "tokens_per_sec": "train/tokens_per_sec",
    "mfu": "train/mfu",
    "eval_loss": "eval/loss",
}


def charts(record: dict) -> dict[str, float]:
    """The scalars of one metrics record under their chart names (eval lines add perplexity; a `scores`
    line, {task: {metric: value, "count": n}}, gives `scores/<task>/<metric>`)."""
    values = {SCALARS[k]: float(v) for k, v in record.items() if k in SCALARS}
    if "eval_loss" in record:
        values["eval/perplexity"] = math.exp(min(float(record["eval_loss"]), 80.0))
    for task, scores in record.get("scores", {}).items():
        values |= {f"scores/{task}/{k}": float(v) for k, v in scores.items() if k != "count"}
    return values


def samples_markdown(samples: list[dict]) -> str:
    """Sample completions as a markdown table (TensorBoard's text plugin renders it)."""

    def cell(text: str | None) -> str:
        return (
            "" if text is None else "`" + text.replace("|", "\\|").replace("\n", "⏎").replace("`", "'") + "`"
        )

    rows = [
        f"| {cell(s['prompt'])} | {cell(s['completion'])} | {cell(s.get('reference'))} |" for s in samples
    ]
    return "\n".join(["| prompt | completion | reference |", "|---|---|---|", *rows])


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as one {dotted.key: value}; lists and tuples become JSON text."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def config_markdown(values: dict) -> str:
    """A flat {key: value} as a two-column markdown table."""
    return "\n".join(
        ["| key | value |", "|---|---|", *(f"| {k} | `{v}` |" for k, v in sorted(values.items()))]
    )


class TensorBoardWriter:
    """One event file under `<output_dir>/tensorboard`, scalars and text, readable by TensorBoard."""

    def __init__(self, output_dir: str):
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._summary_pb2, self._text_metadata = summary_pb2, text_metadata
        self.target = str(epath.Path(output_dir) / "tensorboard")
        self.local = tempfile.mkdtemp(prefix="jsft-tb-") if paths.is_remote(self.target) else self.target
        self.writer = EventFileWriter(self.local, flush_secs=30)

    def _event(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2

        summary = self._summary_pb2.Summary(value=values)
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._event(step, [self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])

    def text(self, step: int, tag: str, markdown: str) -> None:
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[markdown.encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        metadata = self._text_metadata.create_summary_metadata(display_name=tag, description="")
        self._event(step, [self._summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])

    def hparams(self, values: dict) -> None:
        """The HParams dashboard's entry for this run (numbers, strings and booleans only)."""
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.hparams import summary_v2

        kept = {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}
        summary = summary_v2.hparams_pb(kept, start_time_secs=int(time.time()))
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

    def flush(self) -> None:
        self.writer.flush()
        if self.local != self.target:  # copy the event files up to the object store
            for local in pathlib.Path(self.local).iterdir():
                (epath.Path(self.target) / local.name).write_bytes(local.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.local != self.target:
            shutil.rmtree(self.local, ignore_errors=True)


class WandbWriter:
    """A W&B run named after `output_dir`; a resumed training run continues the same W&B run."""

    def __init__(self, project: str, output_dir: str, hyperparameters: dict):
        try:
            import wandb
        except ImportError:
            raise JsftError(
                "log.wandb_project is set but wandb is not installed: pip install 'jsft[wandb]'"
            ) from None
        self.wandb = wandb
        run_id = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:16]
        local_dir = output_dir if not paths.is_remote(output_dir) else tempfile.mkdtemp(prefix="jsft-wandb-")
        self.run = wandb.init(
            project=project,
            name=os.path.basename(os.path.normpath(output_dir)),
            id=run_id,
            resume="allow",
            dir=local_dir,
            config=hyperparameters,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def samples(self, step: int, samples: list[dict]) -> None:
        columns = ["step", "prompt", "completion", "reference"]
        rows = [[step, s["prompt"], s["completion"], s.get("reference")] for s in samples]
        self.run.log({"samples": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def text(self, key: str, values: dict) -> None:
        self.run.summary[key] = json.dumps(values)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class LogBackends:
    """TensorBoard (always) and W&B (with `log.wandb_project`), fed the metrics log's records."""

    def __init__(self, output_dir: str, wandb_project: str = "", hyperparameters: dict | None = None):
        self.tensorboard = TensorBoardWriter(output_dir)
        self.wandb = WandbWriter(wandb_project, output_dir, hyperparameters or {}) if wandb_project else None

    @classmethod
    def for_run(cls, cfg, step: int, total_steps: int, data_stats: dict[str, dict]) -> LogBackends:
        """A run's backends, with its config and data statistics (per mixture) logged at `step`."""
        hyperparameters = flatten(cfg.to_dict()) | {"total_steps": total_steps}
        backends = cls(cfg.output_dir, cfg.log.wandb_project, hyperparameters)
        backends.start(hyperparameters, flatten(data_stats), step)
        return backends

    def start(self, hyperparameters: dict, data_stats: dict, step: int) -> None:
        """Logged once when a run starts (or resumes, at its first step): the config and the data."""
        self.tensorboard.hparams(hyperparameters)
        self.tensorboard.text(step, "run/hyperparameters", config_markdown(hyperparameters))
        self.tensorboard.text(step, "run/data", config_markdown(data_stats))
        if self.wandb:
            self.wandb.text("data", data_stats)
        self.flush()

    def record(self, record: dict) -> None:
        """One metrics.jsonl record: its scalars, or its samples as text."""
        step = int(record["step"])
        values = charts(record)
        if values:
            self.tensorboard.scalars(step, values)
            if self.wandb:
                self.wandb.scalars(step, values)
        if "samples" in record:
            self.tensorboard.text(step, "samples", samples_markdown(record["samples"]))
            if self.wandb:
                self.wandb.samples(step, record["samples"])
        self.flush()  # records come every log.every_steps at most: each is readable at once

    def flush(self) -> None:
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb:
            self.wandb.close()
