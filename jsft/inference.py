"""A trained model ready to answer: a run's checkpoint step or a Hugging Face folder loaded for generation,
prompts read from JSON lines, answers generated in batches and scored per task.

`jsft.cli.chat` (interactive or batch chat) and tools/tiny/accuracy.py are built on it. The model's own chat
template is applied: the HF folder's, or the one a checkpoint was trained with (saved in it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import ml_collections
import transformers
from etils import epath
from jax.sharding import Mesh

from jsft import checkpoint, hf, models, sharding
from jsft.errors import JsftError, one_line
from jsft.generate import Generator, Sampling
from jsft.models import Params


@dataclasses.dataclass
class ChatModel:
    """A model ready to generate: its compiled generator, weights and tokenizer (with chat template)."""

    generator: Generator
    params: Params
    base: Params | None
    tokenizer: transformers.PreTrainedTokenizerBase
    hf_config: dict
    generation_config: dict

    def encode(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids: the conversation rendered by the chat template, ready for a reply."""
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(rendered["input_ids"])

    def decode(self, tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
        if tokens and tokens[-1] in stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens, skip_special_tokens=False)


def checkpoint_folder(path: str) -> str | None:
    """The Orbax folder of a run (`<output_dir>` or `<output_dir>/checkpoints`), or None for an HF folder."""
    for candidate in (epath.Path(path) / "checkpoints", epath.Path(path)):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return str(candidate)
    return None


def load(path: str, step: int | None = None, mesh: Mesh | None = None) -> ChatModel:
    """A run's checkpoint step (default: the latest) or a Hugging Face folder, sharded over `mesh`
    (default: all devices, tensor-parallel where head and MLP sizes divide)."""
    if not epath.Path(path).is_dir():
        raise JsftError(
            f"--model={path} is not a folder (give a run's output_dir, its checkpoints, or an HF folder)"
        )
    mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": -1}))
    folder = checkpoint_folder(path)
    if folder is None:
        if step is not None:
            raise JsftError(f"--step is for checkpoints, but {path} is a Hugging Face folder")
        cfg, hf_config = models.config_from_folder(path, scan_layers=True)
        layout = models.Layout(cfg)
        params = models.load_params(path, layout, mesh)
        return _chat_model(Generator(layout, mesh), params, None, path)
    mngr = checkpoint.manager(folder, read_only=True)
    steps = mngr.all_steps()
    step = max(steps) if step is None else step
    if step not in steps:
        raise JsftError(f"step {step} is not in {folder}; kept steps: {sorted(steps)}")
    layout, run_cfg = checkpoint.saved_layout(mngr, step)
    if run_cfg["lora"]["rank"]:
        raise JsftError(
            f"step {step} in {folder} holds LoRA factors: export it with tools/convert_to_hf.py "
            "(which folds them into the weights) and chat with the exported folder"
        )
    params, _, _ = checkpoint.restore_for_export(mngr, step, layout.shapes, layout.shardings(mesh))
    with tempfile.TemporaryDirectory() as assets:
        for name, content in checkpoint.hf_files(mngr, step).items():
            with open(os.path.join(assets, name), "wb") as f:
                f.write(content)
        return _chat_model(Generator(layout, mesh), params, None, assets)


def _chat_model(generator: Generator, params: Params, base: Params | None, assets: str) -> ChatModel:
    """Reads the tokenizer, config.json and generation_config.json from `assets`."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(assets)
    except (OSError, ValueError) as e:
        raise JsftError(f"cannot load the tokenizer: {one_line(e)}") from None
    if not tokenizer.chat_template:
        raise JsftError("the tokenizer has no chat template to render prompts with")
    return ChatModel(generator, params, base, tokenizer, hf.read_config(assets), generation_config(assets))


def generation_config(folder: str) -> dict:
    """The folder's generation_config.json, or {} without one."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def eos_ids(tokenizer: transformers.PreTrainedTokenizerBase, hf_config: dict, generation: dict) -> list[int]:
    """The model's end tokens: generation_config.json's, else config.json's, else the tokenizer's EOS."""
    eos = generation.get("eos_token_id", hf_config.get("eos_token_id"))
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def sampling(
    model: ChatModel,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str = "",
    use_cache: bool = True,
) -> Sampling:
    """How to sample `model`; stop tokens: `stop` (comma-separated single tokens), else the model's EOS."""
    tokenizer = model.tokenizer
    stop_ids: list[int] = []
    for text in filter(None, (s.strip() for s in stop.split(","))):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise JsftError(f"--stop {text!r} is {len(ids)} tokens, not one token of this tokenizer")
        stop_ids.append(ids[0])
    if not stop_ids:
        stop_ids = eos_ids(tokenizer, model.hf_config, model.generation_config)
    pad_id = model.hf_config.get("pad_token_id")
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=tuple(stop_ids),
        pad_id=pad_id or 0,
        use_cache=use_cache,
    )


def read_prompts(path: str) -> list[tuple[list[dict], str | None]]:
    """(conversation to answer, reference answer or None) per line of a JSONL prompts file."""
    if not os.path.isfile(path):
        raise JsftError(f"--prompts file {path} does not exist")
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = (
                    row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
                )
            except (json.JSONDecodeError, KeyError, TypeError):
                raise JsftError(
                    f'{path}:{number}: expected a JSON object with "messages" or "prompt"'
                ) from None
            reference = None
            if messages and messages[-1].get("role") == "assistant":
                reference, messages = messages[-1].get("content"), messages[:-1]
            prompts.append((messages, reference))
    if not prompts:
        raise JsftError(f"--prompts file {path} has no prompts")
    return prompts


def generate_all(
    model: ChatModel, prompts: list[tuple[list[dict], str | None]], sampling: Sampling, batch_size: int
) -> Iterable[dict]:
    """One record per prompt, generated `batch_size` at a time."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [model.encode(messages) for messages, _ in chunk]
        out = model.generator.generate(model.params, ids, sampling, base=model.base)
        for (messages, reference), tokens in zip(chunk, out.tokens, strict=True):
            record = {"messages": messages, "completion": model.decode(tokens, sampling.stop_ids)}
            yield record if reference is None else record | {"reference": reference}


def exact_match_by_task(records: Iterable[dict]) -> dict[str, tuple[int, int]]:
    """(answered right, asked) per task over the records of `generate_all` that carry a `reference`: a
    completion is right when it equals the reference up to surrounding whitespace. A record's task is its
    last user turn up to the first ':' (`count: abc` -> `count`, the tiny data's prompts), else ''."""
    scores: dict[str, tuple[int, int]] = {}
    for record in records:
        if record.get("reference") is None:
            continue
        users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        task = users[-1].split(":", 1)[0].strip() if users and ":" in users[-1] else ""
        right, asked = scores.get(task, (0, 0))
        scores[task] = (right + (record["completion"].strip() == record["reference"].strip()), asked + 1)
    return dict(sorted(scores.items()))
