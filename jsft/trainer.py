"""The Trainer: everything a run builds once and then repeats.

From (config, layout, mesh) it derives the LoRA spec, the optimizer and its schedule, the shardings of
the `TrainState`, and the jitted train and eval steps. It makes the first state (resumed through its
`Checkpointer`, or fresh from the model weights), evaluates, and runs the step loop: after each step
the registered hooks that are due (logging, evaluation, ...) and then the checkpointer's save policy.
`train.py`, the tools and the tests all build runs through it, so the pieces can never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jsft import models, optim, sharding, step
from jsft.checkpoint import Checkpointer
from jsft.errors import JsftError
from jsft.lora import params as lora_params
from jsft.lora import peft
from jsft.lora.spec import LoraSpec
from jsft.step import BATCH_KEYS, TrainState


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees after a step: the step reached, the new state, the step's metrics (device
    arrays, fetched only by hooks that need them) and this process's host batch."""

    step: int
    state: TrainState
    metrics: dict[str, jax.Array]
    batch: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool  # also after the last step, whatever its number


class Trainer:
    """The compiled pieces of one run and the loop that drives them."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        layout: models.Layout,
        mesh: Mesh,
        *,
        total_steps: int,
        checkpointer: Checkpointer | None = None,
        optimizer: optax.GradientTransformation | None = None,
    ):
        """`optimizer` replaces the config's AdamW (tests use plain SGD to read gradients off updates).

        With LoRA (`lora.rank` > 0) `self.layout` is `layout` with the factors added (`Layout.adapters`)."""
        self.lora = LoraSpec.from_config(cfg.lora)
        if self.lora is not None and layout.lora is None:
            layout = models.Layout(layout.cfg, self.lora, layout.device)
        self.cfg, self.layout, self.mesh = cfg, layout, mesh
        self._row_groups = sharding.row_groups(mesh)[1]  # processes loading distinct rows
        self.total_steps = total_steps
        self.checkpointer = checkpointer
        self.schedule = optim.make_schedule(cfg.optim, total_steps)
        self.optimizer = optimizer or optim.make_optimizer(cfg.optim, total_steps)
        self.shardings = step.state_shardings(layout, self.optimizer, mesh)
        self.train_step = step.make_train_step(
            layout,
            self.optimizer,
            self.shardings,
            mesh,
            grad_accum_steps=cfg.train.grad_accum_steps,
            loss_reduction=cfg.train.loss_reduction,
            z_loss=cfg.train.z_loss,
            router_weights=step.RouterWeights.of(
                layout, cfg.train.router_aux_loss_coef, cfg.train.router_z_loss
            ),
            seed=cfg.train.seed,
        )
        self.eval_step = step.make_eval_step(layout, self.shardings, mesh)
        self.hooks: list[Hook] = []

    # --- states -------------------------------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, without any values (for restoring and compiling)."""
        trainable = step.trainable_shapes(self.layout)
        shapes = jax.eval_shape(lambda p: step.init_state(p, self.optimizer, self.shardings), trainable)
        if self.lora:
            shapes = shapes.replace(base=lora_params.base_shapes(self.layout))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings
        )

    def fresh_state(self, weights: models.Params) -> TrainState:
        """Step 0 from the model's weights: all trained, or with LoRA frozen (quantized if asked) under
        new factors, or the factors of the PEFT adapter `lora.init_from`. `weights` may hold factors
        (`Layout.init`); they are replaced."""
        if not self.lora:
            return step.init_state(weights, self.optimizer, self.shardings)
        base = lora_params.frozen_base(self.layout, weights, self.mesh)
        if self.cfg.lora.init_from:
            trainable = peft.load_peft(self.cfg.lora.init_from, self.layout, self.mesh)
        else:
            trainable = lora_params.init_factors(self.layout, self.cfg.train.seed, self.mesh)
            for name in self.layout.trainable - self.layout.adapters:  # lora.also_train: from the weights
                trainable[name] = jax.device_put(
                    weights[name].astype(self.layout.shapes[name].dtype), self.shardings.params[name]
                )
        return step.init_state(trainable, self.optimizer, self.shardings, base=base)

    def random_state(self, seed: int = 0) -> TrainState:
        """Step 0 from random weights (benchmarks)."""
        return self.fresh_state(self.layout.init(seed, self.mesh))

    def load_state(self, model_path: str) -> TrainState:
        """The checkpointer's resumed state (with the data position restored), else step 0 from the
        model folder. LoRA checkpoints hold only the trained parameters: the frozen base is read from the
        folder (each tensor quantized as soon as it is placed, with `lora.base_quantization`)."""
        restored = (
            self.checkpointer.restore(self.abstract_state(), self.shardings) if self.checkpointer else None
        )
        if restored is not None and not self.lora:
            return restored
        convert = lora_params.freezer(self.layout, self.mesh) if self.lora else None
        weights = models.load_params(model_path, self.layout, self.mesh, convert=convert)
        if restored is None:
            return self.fresh_state(weights)
        return restored.replace(base={n: w for n, w in weights.items() if n not in self.layout.trainable})

    # --- batches ------------------------------------------------------------------------------------

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch, assembled into global arrays. The rows are whole:
        where a context axis splits them over devices of several processes, each takes its tokens."""
        spec = sharding.batch_sharding(self.mesh)
        return {
            k: jax.make_array_from_process_local_data(spec, v, (v.shape[0] * self._row_groups, *v.shape[1:]))
            for k, v in batch.items()
        }

    def abstract_batch(self, rows: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = jax.ShapeDtypeStruct((rows, seq), np.int32, sharding=sharding.batch_sharding(self.mesh))
        return dict.fromkeys(BATCH_KEYS, spec)

    def compile_train_step(self, rows: int, seq: int):
        """The train step compiled (never run) for a global batch of rows x seq: for memory and cost."""
        return self.train_step.lower(self.abstract_state(), self.abstract_batch(rows, seq)).compile()

    # --- evaluation and the loop --------------------------------------------------------------------

    def evaluate(self, state: TrainState, batches: Iterable[dict[str, np.ndarray]]) -> float:
        """Mean trained-token loss over all `batches` (each token weighs the same, whatever its batch)."""
        outputs = [self.eval_step(state.params, state.base, self.device_batch(b)) for b in batches]
        outputs = jax.device_get(outputs)  # one fetch at the end: the host never waits between batches
        loss_sum = sum(float(o["loss_sum"]) for o in outputs)
        tokens = sum(int(o["trained_tokens"]) for o in outputs)
        return loss_sum / max(tokens, 1)

    def add_hook(self, fn: Callable[[StepInfo], None], every: int, at_end: bool = False) -> None:
        """Runs `fn` after every `every`-th step (and after the last one if `at_end`)."""
        self.hooks.append(Hook(fn, every, at_end))

    def fit(self, state: TrainState, data_iter: Iterator[dict[str, np.ndarray]]) -> TrainState:
        """Steps until `total_steps` or an agreed stop request (the caller then `checkpointer.finish`es).

        The non-finite streak of each step is read after the next one is queued, so the host never
        waits for the devices, and a streak of `train.max_nonfinite_steps` stops the run wherever it ends.
        """
        current = int(jax.device_get(state.step))
        previous: jax.Array | None = None
        while current < self.total_steps:
            state, metrics = self.train_step(state, self.device_batch(batch := next(data_iter)))
            current += 1
            self._check_streak(previous, current - 1)
            previous = metrics["nonfinite_streak"]
            info = StepInfo(current, state, metrics, batch)
            for hook in self.hooks:
                if current % hook.every == 0 or (hook.at_end and current == self.total_steps):
                    hook.fn(info)
            if self.checkpointer and self.checkpointer.after_step(current, state):
                break
        self._check_streak(previous, current)
        return state

    def _check_streak(self, streak: jax.Array | None, step_reached: int) -> None:
        if streak is None or int(jax.device_get(streak)) < self.cfg.train.max_nonfinite_steps:
            return
        where = ""
        if self.checkpointer:
            latest, folder = self.checkpointer.mngr.latest_step(), self.checkpointer.directory
            where = f" The last good checkpoint is step {latest} in {folder}"
        raise JsftError(
            f"{int(jax.device_get(streak))} steps in a row had a non-finite loss or gradient (up to step "
            f"{step_reached}); stopped.{where}"
        )
