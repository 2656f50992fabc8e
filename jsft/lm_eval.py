"""The lm-evaluation-harness backend: `JsftLM`, registered with the harness as model `jsft`, answers its three
request types with `jsft.evaluate` (the batched, jitted forward for log-likelihoods and the decode loop of
`jsft.generate`) on a run's step or a Hugging Face folder.

    python -m jsft.lm_eval --model=runs/tiny --tasks=hellaswag,my_task [--include_path=DIR]

Requests are tokenized as the harness's own `hf` backend tokenizes them (`TemplateLM`'s context/continuation
split, the tokenizer's special tokens, the same prefix token for an empty context and the same rolling
windows), so the two agree to float rounding: `tests/test_lm_eval.py` compares them request by request.
Generation is greedy (a request asking for sampling is refused) and ends at the model's EOS tokens or
`max_gen_toks`, then is cut at the request's `until` texts. Local tasks are YAML files with
`dataset_path: json` under `--include_path`, read offline. Only this module (and the command over it)
imports `lm_eval` (the `eval` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from lm_eval import evaluator as harness
from lm_eval import utils as harness_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models import utils as model_utils
from lm_eval.tasks import TaskManager

from jsft import config, evaluate, inference
from jsft.errors import JsftError

MAX_GEN_TOKS = 256  # the harness's default for a request that names no max_gen_toks (as its hf backend)


class JsftLM(TemplateLM):
    """`model_args`: `model` (a run's output_dir or checkpoints, or an HF folder; in Python also a loaded
    `inference.ChatModel`), `step`, `batch_size`, `max_length` (default: `max_position_embeddings`)."""

    backend = "causal"

    def __init__(
        self,
        model: str | inference.ChatModel = "",
        step: int | str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | str | None = None,
        **_harness_settings,  # device, max_batch_size, ...: the mesh decides where jsft runs
    ):
        super().__init__()
        if not model:
            raise JsftError("the jsft lm-eval model needs model_args model=<run or HF folder>")
        if isinstance(model, inference.ChatModel):  # already loaded (tests, benchmarks)
            self.path, self.loaded = "jsft", model
        else:
            self.path = model
            self.loaded = inference.load(model, None if step in (None, "") else int(step))
        self.tokenizer = self.loaded.tokenizer
        size = 16 if batch_size in (None, "", "auto") else int(str(batch_size).split(":")[0])
        self.evaluator = evaluate.Evaluator.for_model(self.loaded, size)
        if max_length:
            self.evaluator.max_length = int(max_length)

    # --- what the harness asks of a model ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after: BOS, else EOS (as the hf backend)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.evaluator.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids with its own special tokens unless told; none for a string already
        starting with the prefix token's text (as the hf backend)."""
        if add_special_tokens is None and model_utils.has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _loglikelihood_tokens(
        self, requests: Sequence[tuple[tuple[str, str] | None, list[int], list[int]]], **_
    ) -> list[tuple[float, bool]]:
        results = self.evaluator.loglikelihoods(
            self.loaded.params, self.loaded.base, [(context, cont) for _, context, cont in requests]
        )
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of `max_length` tokens, the first after
        the prefix token (the harness's own windows); all windows of all texts in one batched pass."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = harness_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(harness_utils.make_disjoint_window, rolling):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += loglikelihood
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy completions, batched per set of generation settings; each cut at its `until` texts."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        out: list[str] = [""] * len(requests)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            settings = model_utils.normalize_gen_kwargs(dict(requests[indices[0]].args[1]), MAX_GEN_TOKS)
            if settings.get("do_sample"):
                raise JsftError(f"the jsft lm-eval backend generates greedily; a task asks for {settings}")
            until = model_utils.handle_stop_sequences(settings.pop("until", None), eos=eos)
            max_new = int(settings.pop("max_gen_toks"))
            room = self.max_length - max_new
            if room < 1:
                raise JsftError(f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            generated = self.evaluator.generate(self.loaded.params, self.loaded.base, prompts, max_new)
            for i, tokens in zip(indices, generated, strict=True):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                out[i] = model_utils.postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


# Registered by name and module (a placeholder the harness resolves when asked for "jsft"), so importing
# this module twice (as `python -m jsft.lm_eval` does) registers the same target.
model_registry.register("jsft", target=f"{__spec__.name if __spec__ else __name__}:JsftLM")


def harness_task(spec: dict, folder: str) -> str:
    """Writes a jsft task (`config.eval_task`'s grammar) into `folder` as a harness task of the same name
    and rows (YAML, written as JSON, which YAML reads): a choice task as `multiple_choice` (acc, acc_norm),
    a generate task of raw `prompt` rows (`chat: False`) as `generate_until` (exact_match; its `stop` texts
    as `until`). Returns the YAML's path; `--include_path=folder` finds it."""
    spec = config.eval_task(spec, "harness_task")
    rows = evaluate.read_rows(spec)
    common = {
        "task": spec["name"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(spec["path"])}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
    }
    if spec["kind"] == "choice":
        task = common | {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": spec["delimiter"],
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        }
    elif spec["chat"] or any(len(r["messages"]) != 1 for r in rows):
        raise JsftError(
            f"task {spec['name']!r}: only raw prompts (chat: False, prompt rows) become harness tasks"
        )
    else:
        task = common | {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {
                "until": list(spec["stop"]),
                "max_gen_toks": spec["max_new_tokens"],
                "do_sample": False,
            },
            "metric_list": [{"metric": "exact_match", "ignore_case": spec["ignore_case"]}],
        }
    path = os.path.join(folder, f"{spec['name']}.yaml")
    with open(path, "w") as f:
        json.dump(task, f, indent=1)
    return path


def run(
    model: str | JsftLM,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    step: int | None = None,
    batch_size: int = 16,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict:
    """The harness's `simple_evaluate` on a jsft model (a path, or a JsftLM already loaded), with the
    tasks of its library and those under `include_path`."""
    lm = model if isinstance(model, JsftLM) else JsftLM(model, step=step, batch_size=batch_size)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or under {include_path}" if include_path else " (local YAML tasks: --include_path=DIR)"
        raise JsftError(f"unknown lm-eval task {unknown[0]!r}: not in the harness's library{where}")
    return harness.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
    )


if __name__ == "__main__":  # `python -m jsft.lm_eval`: the jsft-lm-eval command
    from jsft.cli.lm_eval import main

    main()
