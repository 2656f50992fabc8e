"""Chat templates and assistant-only label masking.

A conversation is rendered with `apply_chat_template` and tokenized once. Trained are exactly the
tokens an assistant turn adds: its content and the end-of-turn token(s) the template emits after it,
never the header that introduces it (the generation prompt) nor anything else.

The reference (`encode_messages_incremental`, the method open-instruct used for Tulu 3) tokenizes a
render of every conversation prefix: an assistant turn i spans from the end of
`messages[:i]` rendered with the generation prompt to the end of `messages[:i + 1]`. It costs two
prefix tokenizations per turn. The fast method (`encode_messages`) renders the same prefixes as text
only (cheap), tokenizes the whole conversation once with character offsets, and maps each prefix's
character length to a token boundary. It then proves, per boundary, that tokenizing the prefix text
gives exactly those tokens, tokenizing only the text after the last added token before the boundary
(Hugging Face tokenizers split text at added tokens and tokenize the pieces independently). Where
any step fails, it falls back to the reference, so both agree token for token wherever the reference
is defined. Where the reference is not defined because a template appends text after the last
message only (Phi-3 adds eos), the fast method ends the turn at the last token boundary the turn's
render shares with the full render.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from collections.abc import Sequence

import numpy as np

from jsft.errors import JsftError

IGNORE = -100
ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")

# The "tulu" template exactly as published (open-instruct CHAT_TEMPLATES["tulu"], used for Tulu 3 and
# OLMo 2): <|system|>\n{c}\n, <|user|>\n{c}\n, <|assistant|>\n{c}{eos} plus \n unless it is the last
# message; the generation prompt is <|assistant|>\n.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
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


@functools.lru_cache(maxsize=64)
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


def check_tools(tools: object) -> list[dict] | None:
    """The optional `tools` column: None, a list of JSON schemas, or that list as a JSON string."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise BadRow("template_error", f"tools is not valid JSON: {e}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRow("template_error", f"tools must be a list of JSON schemas, got {type(tools).__name__}")
    return tools or None


class ChatEncoder:
    """Encodes conversations for one tokenizer, template, length limit and `train_on` choice.

    `fallbacks` counts the conversations the fast method handed to the incremental reference.
    """

    def __init__(
        self,
        tokenizer,
        chat_template: str | None = None,
        max_seq_length: int | None = None,
        train_on: str = "all_assistant_turns",
    ):
        if train_on not in TRAIN_ON:
            raise JsftError(f"data.train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        self.tokenizer = tokenizer
        self.template = resolve_template(chat_template)
        self.max_seq_length = max_seq_length
        self.train_on = train_on
        self.fallbacks = 0
        self._backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer of fast tokenizers
        self._added_ids = np.array(sorted(tokenizer.added_tokens_decoder), np.int64)

    def _targets(self, messages: list[dict]) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return turns if self.train_on == "all_assistant_turns" else turns[-1:]

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool, tools) -> list[str]:
        """Texts of several conversations; any template failure makes the row a template_error."""
        try:
            return self.tokenizer.apply_chat_template(
                conversations,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as e:  # jinja raises many kinds of errors for templates that reject input
            raise BadRow("template_error", f"{type(e).__name__}: {e}") from None

    def tokenize(self, text: str) -> list[int]:
        """Token ids exactly as `apply_chat_template(tokenize=True)` produces them for `text`."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _finish(self, input_ids, labels: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(input_ids, np.int32)
        if self.max_seq_length is not None:
            ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        return {"input_ids": ids, "labels": labels}

    def encode_incremental(self, messages: object, tools: object = None) -> dict[str, np.ndarray]:
        """The reference: two prefix renders and tokenizations per assistant turn."""
        messages, tools = check_messages(messages), check_tools(tools)
        input_ids = self.tokenize(self.render([messages], False, tools)[0])
        labels = np.full(len(input_ids), IGNORE, np.int32)
        for i in self._targets(messages):
            header = self.tokenize(self.render([messages[:i]], True, tools)[0])
            turn = self.tokenize(self.render([messages[: i + 1]], False, tools)[0])
            if input_ids[: len(header)] != header or input_ids[: len(turn)] != turn:
                raise BadRow(
                    "template_error", f"rendering up to message {i} is not a token prefix of the whole"
                )
            labels[len(header) : len(turn)] = input_ids[len(header) : len(turn)]
        return self._finish(input_ids, labels)

    def encode(self, messages: object, tools: object = None) -> dict[str, np.ndarray]:
        """The fast method: text-only prefix renders, one tokenization, verified token boundaries."""
        messages, tools = check_messages(messages), check_tools(tools)
        if self._backend is None:  # slow tokenizers give no offsets
            return self.encode_incremental(messages, tools)
        targets = self._targets(messages)
        turn_prefixes = [messages[: i + 1] for i in targets if i + 1 < len(messages)]
        full, *turn_texts = self.render([messages, *turn_prefixes], False, tools)
        header_texts = self.render([messages[:i] for i in targets], True, tools)
        if len(turn_texts) < len(targets):  # the last message is an assistant turn: its prefix is all
            turn_texts.append(full)
        encoding = self._backend.encode(full, add_special_tokens=False)
        ids = encoding.ids
        starts = [s for s, _ in encoding.offsets]
        ends = [e for _, e in encoding.offsets]

        spans, cuts = [], []  # token spans to train; (char, token) boundaries to verify
        for header, turn in zip(header_texts, turn_texts, strict=True):
            if not full.startswith(header):
                return self._fall_back(messages, tools)
            begin = self._token_boundary(len(header), starts, ends)
            if full.startswith(turn):
                end = self._token_boundary(len(turn), starts, ends)
            else:  # the turn's render ends differently (e.g. a trailing eos): stop where they agree
                agree = len(os.path.commonprefix([full, turn]))
                end = bisect.bisect_right(ends, agree)
            if begin is None or end is None:
                return self._fall_back(messages, tools)
            spans.append((begin, end))
            cuts += [(len(header), begin), (ends[end - 1] if end else 0, end)]
        if not self._verify(full, ids, starts, cuts):
            return self._fall_back(messages, tools)
        labels = np.full(len(ids), IGNORE, np.int32)
        for begin, end in spans:
            labels[begin:end] = ids[begin:end]
        return self._finish(ids, labels)

    def _fall_back(self, messages: list[dict], tools) -> dict[str, np.ndarray]:
        self.fallbacks += 1
        return self.encode_incremental(messages, tools)

    @staticmethod
    def _token_boundary(char: int, starts: list[int], ends: list[int]) -> int | None:
        """The number of tokens covering exactly text[:char], or None if `char` falls inside a token."""
        count = bisect.bisect_left(starts, char)
        return count if count == 0 or ends[count - 1] <= char else None

    def _verify(self, full: str, ids: list[int], starts: list[int], cuts: list[tuple[int, int]]) -> bool:
        """Whether tokenizing full[:char] gives ids[:count] for every (char, count) cut.

        Only the text from the last added token before the cut is re-tokenized: the tokenizer splits
        at added tokens, so everything before it is tokenized identically in both.
        """
        anchors = np.flatnonzero(np.isin(ids, self._added_ids))
        windows, expected = [], []
        for char, count in cuts:
            if count == len(ids) and char == len(full) or count == 0:
                continue
            at = np.searchsorted(anchors, count) - 1  # the last added token before the cut
            first = int(anchors[at]) if at >= 0 else 0
            windows.append(full[starts[first] if first else 0 : char])
            expected.append(ids[first:count])
        if not windows:
            return True
        # one call each: the windows are short, and encode_batch's thread pool costs more than it saves
        encode = self._backend.encode
        return all(
            encode(w, add_special_tokens=False).ids == want for w, want in zip(windows, expected, strict=True)
        )


def encode_messages(
    messages: list[dict],
    tokenizer,
    max_seq_length: int | None = None,
    chat_template: str | None = None,
    *,
    tools: list[dict] | None = None,
    train_on: str = "all_assistant_turns",
) -> dict[str, np.ndarray]:
    """Tokens of one conversation and labels that train only the assistant turns.

    Returns int32 `input_ids` and `labels`, where `labels[i] == input_ids[i]` for trained tokens and
    -100 elsewhere. `chat_template` is a built-in name, a Jinja file or text, or None for the tokenizer's.
    """
    return ChatEncoder(tokenizer, chat_template, max_seq_length, train_on).encode(messages, tools)


def encode_messages_incremental(
    messages: list[dict],
    tokenizer,
    max_seq_length: int | None = None,
    chat_template: str | None = None,
    *,
    tools: list[dict] | None = None,
    train_on: str = "all_assistant_turns",
) -> dict[str, np.ndarray]:
    """`encode_messages` by the incremental reference method (slow; for tests and benchmarks)."""
    return ChatEncoder(tokenizer, chat_template, max_seq_length, train_on).encode_incremental(messages, tools)
