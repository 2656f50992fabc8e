"""Scored evaluation: task files read and checked, answers generated or choices weighed on the training
mesh, and per-task scores with their counts.

A task (grammar: `config.EVAL_TASK_KEYS`) is a local JSONL file and how to score it:
- `generate`: the prompt is completed greedily (the decode loop of `jsft.generate`) and compared with the
  answer by `exact_match` (equal), `contains` (the answer inside the completion) or `final_answer` (the
  answers extracted by `answer_regex`, default GSM8K's `#### X`, else the last number in the text; a
  reference it finds nothing in is taken whole). Before
  comparing, texts are normalised: surrounding whitespace stripped, inner runs of whitespace made one
  space, lower-cased with `ignore_case`; an extracted final answer also loses `,` `$` and a trailing `.`,
  and two numbers compare by value (`42.0` = `42`).
- `choice`: the log-likelihood of each choice (`delimiter` + choice) after the prompt, in one batched and
  jitted forward pass (compute dtype, log-softmax in float32); `acc` takes the likeliest choice, `acc_norm`
  the likeliest per character of the choice (lm-evaluation-harness's definition, without the delimiter).

The same `Evaluator` serves the `log.eval_tasks` hook of a run, `python -m jsft.eval` after one, and the
lm-evaluation-harness backend (`jsft.lm_eval`), whose requests are the same two operations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from jsft import config, inference, sharding
from jsft.errors import JsftError
from jsft.generate import PROMPT_BUCKET, Generator, Sampling
from jsft.models import Decoder, Layout, Params

CONTINUATION_BUCKET = 8  # scored positions are padded to a multiple of this (few compiled shapes)
GSM8K_ANSWER = r"####\s*(.+)"
NUMBER = r"-?[$0-9.,]*[0-9]"


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's settings (`config.eval_task`) and its checked rows."""

    spec: dict
    rows: list[dict]

    @property
    def name(self) -> str:
        return self.spec["name"]


def load_tasks(entries: Sequence[object], where: str = "--tasks") -> list[Task]:
    """Every task's grammar and every row checked before any model loads: a mistake is one line naming the
    file, the row and the key."""
    specs = [config.eval_task(entry, where) for entry in entries]
    if not specs:
        raise JsftError(f"{where}: no tasks given")
    return [Task(spec, read_rows(spec)) for spec in specs]


def read_rows(spec: dict) -> list[dict]:
    """A task file's rows, each checked against its kind's row grammar (module docstring)."""
    path = spec["path"]
    if not os.path.isfile(path):
        raise JsftError(f"task {spec['name']!r}: {path} does not exist")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsftError(f"{path}:{number}: not JSON ({e.msg})") from None
            check = _generate_row if spec["kind"] == "generate" else _choice_row
            rows.append(check(row, f"{path}:{number}"))
            if spec["limit"] and len(rows) == spec["limit"]:
                break
    if not rows:
        raise JsftError(f"task {spec['name']!r}: {path} has no rows")
    return rows


def _generate_row(row: object, where: str) -> dict:
    """{"messages": [...], "answer": str}: a "prompt" becomes one user turn; a conversation's last
    assistant turn becomes the answer when the row has no "answer"."""
    if not isinstance(row, dict):
        raise JsftError(f"{where}: a row is a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise JsftError(f'{where}: key "messages" must be a non-empty list of messages')
        if "answer" not in row and messages[-1].get("role") == "assistant":
            return {
                "messages": messages[:-1],
                "answer": _text(messages[-1].get("content"), where, "messages"),
            }
    elif "prompt" in row:
        messages = [{"role": "user", "content": _text(row["prompt"], where, "prompt")}]
    else:
        raise JsftError(f'{where}: a generate row needs "prompt" or "messages"')
    if "answer" not in row:
        raise JsftError(f'{where}: key "answer" is missing (or end "messages" with the assistant\'s answer)')
    return {"messages": messages, "answer": _text(row["answer"], where, "answer")}


def _choice_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise JsftError(f"{where}: a row is a JSON object, got {type(row).__name__}")
    for key in ("prompt", "choices", "answer"):
        if key not in row:
            raise JsftError(f'{where}: key "{key}" is missing (a choice row has prompt, choices, answer)')
    choices = row["choices"]
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise JsftError(f'{where}: key "choices" must be a list of two or more texts')
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise JsftError(f'{where}: key "answer" must be the index of the right choice (0-{len(choices) - 1})')
    return {"prompt": _text(row["prompt"], where, "prompt"), "choices": choices, "answer": answer}


def _text(value: object, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise JsftError(f'{where}: key "{key}" must be a text, got {type(value).__name__}')
    return value


# --- scoring texts ------------------------------------------------------------------------------------


def normalise(text: str, ignore_case: bool = False) -> str:
    """Surrounding whitespace stripped, inner whitespace runs made one space (lower-cased if asked)."""
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


def final_answer(text: str, pattern: str = "") -> str | None:
    """The answer a text ends on: `pattern`'s first group (else its match) at its first match, else GSM8K's
    `#### X`, else the last number; `,` `$` and a trailing `.` removed. None when there is none."""
    found = None
    if pattern:
        match = re.search(pattern, text)
        found = None if match is None else match.group(1) if match.groups() else match.group(0)
    else:
        match = re.search(GSM8K_ANSWER, text)
        numbers = re.findall(NUMBER, text)
        found = match.group(1) if match else numbers[-1] if numbers else None
    if found is None:
        return None
    return normalise(found).replace(",", "").replace("$", "").rstrip(".")


def _same_answer(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return a == b


def is_correct(completion: str, answer: str, spec: dict) -> bool:
    """Whether a generated completion answers right under the task's `score` (module docstring)."""
    ignore_case = spec.get("ignore_case", False)
    if spec["score"] == "final_answer":
        pattern = spec.get("answer_regex", "")
        wanted = final_answer(answer, pattern)  # a reference the pattern does not match counts whole
        return _same_answer(final_answer(completion, pattern), wanted or final_answer(answer, "(?s)(.+)"))
    got, want = normalise(completion, ignore_case), normalise(answer, ignore_case)
    return got == want if spec["score"] == "exact_match" else want in got


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the `stop` texts (lm-eval's `until`)."""
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    return text


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: trailing spaces of the context
    move to the continuation, and the whole text is encoded once and cut at the context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


# --- the model's side -----------------------------------------------------------------------------------


def _bucket(n: int, size: int) -> int:
    return max(size, -(-n // size) * size)


def _continuation_logprobs(model: Decoder, ids, positions, segment_ids, targets):
    """Per scored position (the last `targets.shape[1]` of left-padded rows): log p(target) in float32
    and whether the target is the argmax."""
    hidden = model.hidden_states(ids, positions, segment_ids)[:, -targets.shape[1] :]
    logits = model.logits_from_hidden(hidden).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


class Evaluator:
    """Log-likelihoods and greedy generations of one model layout on one mesh (parameters stay sharded
    as they are; inputs are replicated), and the tasks scored with them. Batches are padded to
    `batch_size` rows and to bucketed lengths, so a handful of programs are compiled in all."""

    def __init__(
        self,
        layout: Layout,
        mesh: Mesh,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stop_ids: Sequence[int],
        chat_template: str | None = None,
        batch_size: int = 16,
        max_length: int = 2048,
    ):
        if batch_size < 1:
            raise JsftError(f"the evaluation batch size must be at least 1, got {batch_size}")
        self.layout, self.mesh, self.tokenizer = layout, mesh, tokenizer
        self.stop_ids, self.chat_template = tuple(stop_ids), chat_template
        self.batch_size, self.max_length = batch_size, max_length
        self.pad_id = tokenizer.pad_token_id or 0
        self.generator = Generator(layout, mesh)
        self._scorers: dict[tuple, Callable] = {}

    @classmethod
    def for_model(cls, model: inference.ChatModel, batch_size: int = 16) -> Evaluator:
        """A loaded run step or HF folder: its EOS tokens end answers, its context length bounds inputs."""
        generator = model.generator
        return cls(
            generator.layout,
            generator.mesh,
            model.tokenizer,
            stop_ids=inference.sampling(model, max_new_tokens=1).stop_ids,
            batch_size=batch_size,
            max_length=int(model.hf_config.get("max_position_embeddings") or 2048),
        )

    def _scorer(self, params: Params, base: Params | None) -> Callable:
        key = (jax.tree.structure((params, base)),)
        if key not in self._scorers:

            def traced(params, base, ids, positions, segment_ids, targets):
                with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                    model = self.layout.merge(params if base is None else {**base, **params})
                    return _continuation_logprobs(model, ids, positions, segment_ids, targets)

            replicated = sharding.replicated(self.mesh)
            weights = jax.tree.map(lambda a: a.sharding, (params, base))
            self._scorers[key] = jax.jit(
                traced, in_shardings=(*weights, *[replicated] * 4), out_shardings=replicated
            )
        return self._scorers[key]

    def loglikelihoods(
        self, params: Params, base: Params | None, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per
        (context ids, continuation ids) pair. As lm-eval does, the model sees (context + continuation)[:-1],
        cut from the left to `max_length` tokens."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        score = self._scorer(params, base)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs, conts = [], []
            for i in chunk:
                context, continuation = list(pairs[i][0]), list(pairs[i][1])
                if not continuation:
                    raise JsftError("a log-likelihood request has an empty continuation")
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                conts.append(continuation[-len(inputs[-1]) :])  # past max_length, the tokens that fit
            width = _bucket(max(len(x) for x in inputs), PROMPT_BUCKET)
            scored = min(_bucket(max(len(c) for c in conts), CONTINUATION_BUCKET), width)
            arrays = np.zeros((4, self.batch_size, width), np.int32)  # ids, positions, segments, targets
            for row, (tokens, continuation) in enumerate(zip(inputs, conts, strict=True)):
                arrays[0, row, width - len(tokens) :] = tokens
                arrays[1, row, width - len(tokens) :] = np.arange(len(tokens))
                arrays[2, row, width - len(tokens) :] = 1
                arrays[3, row, width - len(continuation) :] = continuation
            for row in range(len(chunk), self.batch_size):  # filler rows: one token, never read
                arrays[:, row, -1] = (0, 0, 1, 0)
            logprobs, greedy = jax.device_get(score(params, base, *arrays[:3], arrays[3, :, -scored:]))
            for row, i in enumerate(chunk):
                n = len(conts[row])
                results[i] = (float(np.sum(logprobs[row, -n:])), bool(np.all(greedy[row, -n:])))
        return results

    def generate(
        self, params: Params, base: Params | None, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy new tokens per prompt, up to a stop id (not included) or `max_new_tokens`."""
        sampling = Sampling(max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id)
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [list(p) for p in prompts[start : start + self.batch_size]]
            filled = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # one compiled batch size
            generated = self.generator.generate(params, filled, sampling, base=base)
            for tokens in generated.tokens[: len(chunk)]:
                out.append(tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens)
        return out

    def prompt_ids(self, messages: list[dict], chat: bool) -> list[int]:
        """A generate row's prompt: rendered by the chat template, or its user text as it is."""
        if not chat:
            return self.tokenizer.encode("\n".join(m["content"] for m in messages))
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, return_dict=True
        )
        return list(rendered["input_ids"])

    def score(self, params: Params, base: Params | None, tasks: Sequence[Task]) -> dict[str, dict]:
        """Per task: its scores and `count` (rows scored); `records` holds one dict per row."""
        return {task.name: self.score_task(params, base, task) for task in tasks}

    def score_task(self, params: Params, base: Params | None, task: Task) -> dict:
        spec = task.spec
        if spec["kind"] == "choice":
            pairs = [
                encode_pair(self.tokenizer, row["prompt"], spec["delimiter"] + choice)
                for row in task.rows
                for choice in row["choices"]
            ]
            flat = iter(self.loglikelihoods(params, base, pairs))
            records = []
            for row in task.rows:
                lls = [next(flat)[0] for _ in row["choices"]]
                per_char = [ll / max(len(c), 1) for ll, c in zip(lls, row["choices"], strict=True)]
                records.append(
                    row
                    | {
                        "loglikelihoods": lls,
                        "acc": float(np.argmax(lls) == row["answer"]),
                        "acc_norm": float(np.argmax(per_char) == row["answer"]),
                    }
                )
            metrics = ("acc", "acc_norm")
        else:
            prompts = [self.prompt_ids(row["messages"], spec["chat"]) for row in task.rows]
            generated = self.generate(params, base, prompts, spec["max_new_tokens"])
            records = []
            for row, tokens in zip(task.rows, generated, strict=True):
                completion = cut_at_stop(
                    self.tokenizer.decode(tokens, skip_special_tokens=True), spec["stop"]
                )
                right = is_correct(completion, row["answer"], spec)
                records.append(row | {"completion": completion, spec["score"]: float(right)})
            metrics = (spec["score"],)
        scores = {m: float(np.mean([r[m] for r in records])) for m in metrics}
        return scores | {"count": len(records), "records": records}


def without_records(scores: dict[str, dict]) -> dict[str, dict]:
    """The scores as written to a metrics log: per task its numbers, without the per-row records."""
    return {name: {k: v for k, v in s.items() if k != "records"} for name, s in scores.items()}
