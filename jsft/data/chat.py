"""Chat templates and assistant-only label masking.

`encode_messages` renders a conversation with `apply_chat_template` and trains exactly the tokens an
assistant turn adds: its content and whatever end-of-turn tokens the template emits after it, but not
the header that introduces it (the generation prompt). Spans are found by rendering prefixes of the
conversation (the method open-instruct used for Tulu 3), and checked: a template whose prefix render
is not a token prefix of the full render is an error, never a silent mis-mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jsft.errors import JsftError

IGNORE = -100
ROLES = ("system", "user", "assistant")

# The Tulu 3 format: <|system|>\n{c}\n, <|user|>\n{c}\n, <|assistant|>\n{c}{eos} followed by \n unless
# it is the last message; the generation prompt is <|assistant|>\n.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"tulu": TULU_TEMPLATE, "chatml": CHATML_TEMPLATE}


class BadRow(ValueError):
    """A conversation that cannot be trained on; `reason` is a short tag used to count drops."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def resolve_template(name_or_path: str | None) -> str | None:
    """None/"" -> the tokenizer's own template; a built-in name; a Jinja file path; or Jinja text."""
    if not name_or_path:
        return None
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return f.read()
    if "{%" in name_or_path or "{{" in name_or_path:
        return name_or_path
    raise JsftError(
        f"chat template {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
    )


def check_messages(messages: object) -> list[dict]:
    """Validates the `messages` format, raising BadRow with the reason."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise BadRow("empty", "messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise BadRow("bad_role", f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise BadRow("non_string_content", f"message {i} content is {type(m.get('content')).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant", "conversation has no assistant turn")
    return list(messages)


def encode_messages(
    messages: list[dict], tokenizer, max_seq_length: int | None = None, chat_template: str | None = None
) -> dict[str, np.ndarray]:
    """Tokens of one conversation and labels that train only the assistant turns.

    Returns int32 `input_ids` and `labels`, where `labels[i] == input_ids[i]` for trained tokens and
    -100 elsewhere. `chat_template` is a built-in name, a Jinja file or text, or None for the tokenizer's.
    """
    messages = check_messages(messages)
    template = resolve_template(chat_template)

    def render(msgs: list[dict], add_generation_prompt: bool = False) -> list[int]:
        try:
            out = tokenizer.apply_chat_template(
                msgs,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # jinja raises many kinds of errors for templates that reject input
            raise BadRow("template_error", f"{type(e).__name__}: {e}") from None
        return list(out["input_ids"])

    input_ids = render(messages)
    labels = np.full(len(input_ids), IGNORE, np.int32)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = render(messages[:i], add_generation_prompt=True) if i else []
        turn = render(messages[: i + 1])
        if input_ids[: len(header)] != header or input_ids[: len(turn)] != turn:
            raise BadRow("template_error", f"rendering up to message {i} is not a token prefix of the whole")
        labels[len(header) : len(turn)] = input_ids[len(header) : len(turn)]
    ids = np.asarray(input_ids, np.int32)
    if max_seq_length is not None:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return {"input_ids": ids, "labels": labels}
