"""Assistant-only label masking: the tokens and labels of a conversation rendered by its chat template.

A conversation is rendered once with `apply_chat_template` and tokenized once. Each assistant turn is
trained on exactly the tokens it has in that full render: its body (reasoning, content, tool calls,
as the template writes them there) and the end-of-turn text the template emits after it, never the
header that introduces it (the generation prompt) nor anything else. Templates may rewrite history
(Qwen3 drops `<think>` blocks of earlier turns), move system text or insert preambles, so a turn is
located in the full render itself:

- Start: where the full render continues the turn's prompt (the messages before it rendered with
  the generation prompt), the turn starts at the prompt's end. Otherwise after the text the template
  writes after the previous message's content in that prompt (the previous message's closing and
  the assistant header), found after that content in the full render.
- End: the end of the full render for the last message; where the full render continues the render
  of the messages through the turn, that render's end. Otherwise where the next message's opening
  begins: the text the template writes between an assistant turn and the next message's content,
  less the assistant's closing, found before that content in the full render.
- Contents are located by rendering the conversation again with a unique sentinel in place of each
  (non-assistant) content: the sentinels split the render into the template's text and the contents,
  which must rebuild the full render exactly (else each content is located by a render of its own).
  A system, user or tool message whose content is not in the full render drops the row
  (`message_not_rendered`): the template ignores it.

A turn whose ends are not found is counted as `turn_not_located`. The tokens of a span are those
between its ends; a token across an end goes to the side of its first non-blank character.

`encode_incremental` is the reference open-instruct used for Tulu 3 (prefix renders tokenized one by
one); for templates whose prefix renders are prefixes of the full render both agree token for token.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np

from jsft.config import ON_UNLOCATED_TURN, TRAIN_ON
from jsft.data.templates import check_messages, check_tools, resolve_template, tool_call_names
from jsft.errors import BadRow, JsftError, SetupError, one_line

IGNORE = -100
# Pairs of private-use characters that open and close a sentinel; the first pair absent from a
# conversation's render is used.
_SENTINEL_MARKS = (("\ue000", "\ue001"), ("\ue002", "\ue003"), ("\uf8fe", "\uf8ff"))


@dataclasses.dataclass
class _Render:
    """One conversation's full render and what is known about where its messages sit in it."""

    messages: list[dict]
    tools: list[dict] | None
    text: str
    marks: tuple[str, str]
    contents: dict[int, tuple[int, int]]  # message index -> character span of its content

    def sentinel(self, index: int) -> str:
        return f"{self.marks[0]}{index}{self.marks[1]}"

    def with_sentinel(self, index: int) -> dict:
        return {**self.messages[index], "content": self.sentinel(index)}


class ChatEncoder:
    """Encodes conversations for one tokenizer, template, length limit and `train_on` choice.

    `fallbacks` counts conversations encoded by the incremental method because the tokenizer is a
    slow one, without character offsets.
    """

    def __init__(
        self,
        tokenizer,
        chat_template: str | None = None,
        max_seq_length: int | None = None,
        train_on: str = "all_assistant_turns",
        on_unlocated_turn: str = "drop_row",
    ):
        if train_on not in TRAIN_ON:
            raise JsftError(f"data.train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if on_unlocated_turn not in ON_UNLOCATED_TURN:
            raise JsftError(
                f"data.on_unlocated_turn must be one of {', '.join(ON_UNLOCATED_TURN)}, "
                f"got {on_unlocated_turn!r}"
            )
        self.tokenizer = tokenizer
        self.template = resolve_template(chat_template)
        self.max_seq_length = max_seq_length
        self.train_on = train_on
        self.on_unlocated_turn = on_unlocated_turn
        self.fallbacks = 0
        self._backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer of fast tokenizers

    def _targets(self, messages: list[dict], trainable_from: int) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= trainable_from]
        return turns if self.train_on == "all_assistant_turns" else turns[-1:]

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool, tools) -> list[str]:
        """Texts of several conversations.

        A template failure caused by the row makes it a template_error; a missing package or an
        unreadable file is the environment's fault and stops the run.
        """
        try:
            return self.tokenizer.apply_chat_template(
                conversations,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except (ImportError, OSError, MemoryError) as e:
            raise SetupError(f"rendering the chat template failed: {one_line(e, with_type=True)}") from None
        except Exception as e:  # jinja raises many kinds of errors for templates that reject input
            raise BadRow("template_error", one_line(e, with_type=True)) from None

    def _render_each(self, conversations: list[list[dict]], add_generation_prompt: bool, tools) -> list:
        """Like `render`, with None for each conversation the template rejects."""
        try:
            return self.render(conversations, add_generation_prompt, tools)
        except BadRow:
            out = []
            for conversation in conversations:
                try:
                    out += self.render([conversation], add_generation_prompt, tools)
                except BadRow:
                    out.append(None)
            return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids exactly as `apply_chat_template(tokenize=True)` produces them for `text`."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _finish(self, input_ids, labels: np.ndarray, untrained_turns=None) -> dict:
        ids = np.asarray(input_ids, np.int32)
        if self.max_seq_length is not None:
            ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        return {"input_ids": ids, "labels": labels, "untrained_turns": dict(untrained_turns or {})}

    def encode_incremental(
        self, messages: object, tools: object = None, trainable_from: int = 0
    ) -> dict[str, np.ndarray]:
        """The reference: two prefix renders and tokenizations per assistant turn."""
        messages, tools = check_messages(messages), check_tools(tools)
        input_ids = self.tokenize(self.render([messages], False, tools)[0])
        labels = np.full(len(input_ids), IGNORE, np.int32)
        for i in self._targets(messages, trainable_from):
            header = self.tokenize(self.render([messages[:i]], True, tools)[0])
            turn = self.tokenize(self.render([messages[: i + 1]], False, tools)[0])
            if input_ids[: len(header)] != header or input_ids[: len(turn)] != turn:
                raise BadRow(
                    "template_error", f"rendering up to message {i} is not a token prefix of the whole"
                )
            labels[len(header) : len(turn)] = input_ids[len(header) : len(turn)]
        return self._finish(input_ids, labels)

    def encode(self, messages: object, tools: object = None, trainable_from: int = 0) -> dict:
        """Tokens of the full render and labels on the tokens of each located assistant turn.

        Assistant turns before message `trainable_from` are never trained. Returns int32 `input_ids`
        and `labels` (-100 where not trained) and `untrained_turns`: target turns left untrained,
        by reason (with on_unlocated_turn="drop_row" such a turn drops the row instead).
        """
        messages, tools = check_messages(messages), check_tools(tools)
        if self._backend is None:  # slow tokenizers give no offsets
            self.fallbacks += 1
            return self.encode_incremental(messages, tools, trainable_from)
        targets = self._targets(messages, trainable_from)
        if not targets:
            raise BadRow("no_assistant", f"no assistant turn after message {trainable_from}")
        rendered = self._locate_contents(messages, tools, targets)
        prompts = self._render_each([messages[:i] for i in targets], True, tools)
        turns = self._render_each([messages[: i + 1] for i in targets], False, tools)
        spans, untrained = [], collections.Counter()
        for i, prompt, turn in zip(targets, prompts, turns, strict=True):
            start, end = self._turn_start(rendered, i, prompt), self._turn_end(rendered, i, turn)
            if start is None or end is None or start >= end:
                if self.on_unlocated_turn == "drop_row":
                    raise BadRow("turn_not_located", f"assistant message {i} not found in the full render")
                untrained["turn_not_located"] += 1
                continue
            missing = [name for name in tool_call_names(messages[i]) if name not in rendered.text[start:end]]
            if missing:
                raise BadRow(
                    "tool_calls_not_rendered", f"message {i} calls {missing[0]!r}; the template omits it"
                )
            spans.append((start, end))
        if not spans:
            raise BadRow("turn_not_located", "no assistant turn found in the full render")
        encoding = self._backend.encode(rendered.text, add_special_tokens=False)
        offsets = np.array(encoding.offsets, np.int64).reshape(-1, 2)
        trained = np.zeros(len(encoding.ids), bool)
        for begin, end in spans:
            first, last = (self._token_boundary(rendered.text, offsets, c) for c in (begin, end))
            trained[first:last] = True
        ids = np.asarray(encoding.ids, np.int32)
        return self._finish(ids, np.where(trained, ids, IGNORE).astype(np.int32), untrained)

    def encode_text(self, text: object) -> dict:
        """A plain document (continued pretraining): BOS as the tokenizer adds it, then eos; all trained."""
        if not isinstance(text, str):
            raise BadRow("non_string_content", f"text is {type(text).__name__}")
        if not text.strip():
            raise BadRow("empty", "text is empty")
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        ids = np.asarray(ids, np.int32)
        return self._finish(ids, ids.copy())

    @staticmethod
    def _token_boundary(text: str, offsets: np.ndarray, char: int) -> int:
        """The index of the first token after character `char`.

        A token that spans `char` (an added token whose offsets take in the whitespace it strips, or
        text the tokenizer merged across the boundary) goes to the side its first non-blank character
        is on.
        """
        starts = offsets[:, 0]
        after = int(np.searchsorted(starts, char, side="left"))
        if after == 0 or offsets[after - 1, 1] <= char:
            return after
        begin, end = offsets[after - 1]  # several byte-level tokens may share one character's offsets
        piece = text[begin:end]
        core = begin + len(piece) - len(piece.lstrip())
        return int(np.searchsorted(starts, begin, side="left")) if core >= char else after

    def _locate_contents(self, messages: list[dict], tools, targets: list[int]) -> _Render:
        """The full render, with the content spans of every message but the target assistant turns.

        Raises message_not_rendered when a system, user or tool message's content (not blank) is not in it.
        """
        full = self.render([messages], False, tools)[0]
        marks = next((m for m in _SENTINEL_MARKS if m[0] not in full and m[1] not in full), None)
        if marks is None:
            raise BadRow("turn_not_located", "the render holds every sentinel character")
        rendered = _Render(messages, tools, full, marks, {})
        neighbours = {j for i in targets for j in (i - 1, i + 1)}
        wanted = [
            j
            for j, m in enumerate(messages)
            if m["role"] != "assistant" or (j in neighbours and j not in targets and "content" in m)
        ]
        if not wanted:
            return rendered
        replaced = [rendered.with_sentinel(j) if j in wanted else m for j, m in enumerate(messages)]
        together = self._render_each([replaced], False, tools)[0]
        rendered.contents = self._split(rendered, together, wanted) if together is not None else {}
        if not rendered.contents:  # the template changes what it writes with the content: one at a time
            singles = [
                [rendered.with_sentinel(j) if k == j else m for k, m in enumerate(messages)] for j in wanted
            ]
            for j, text in zip(wanted, self._render_each(singles, False, tools), strict=True):
                span = self._around(rendered, text, j)
                if span is not None:
                    rendered.contents[j] = span
        for j in wanted:
            if (
                messages[j]["role"] != "assistant"
                and messages[j]["content"].strip()
                and j not in rendered.contents
            ):
                raise BadRow(
                    "message_not_rendered", f"message {j} ({messages[j]['role']}) is not in the render"
                )
        return rendered

    @staticmethod
    def _split(rendered: _Render, text: str, indices: list[int]) -> dict[int, tuple[int, int]]:
        """Content spans from a render with every content in `indices` replaced by its sentinel.

        Empty unless putting the contents back in place of the sentinels gives the full render.
        """
        found = sorted((text.find(rendered.sentinel(j)), j) for j in indices)
        if found[0][0] < 0 or any(text.count(rendered.sentinel(j)) != 1 for j in indices):
            return {}
        pieces, spans, cursor, length = [], {}, 0, 0
        for position, j in found:
            content = rendered.messages[j]["content"]
            pieces += [text[cursor:position], content]
            length += position - cursor
            spans[j] = (length, length + len(content))
            length += len(content)
            cursor = position + len(rendered.sentinel(j))
        pieces.append(text[cursor:])
        return spans if "".join(pieces) == rendered.text else {}

    @staticmethod
    def _around(rendered: _Render, text: str | None, j: int) -> tuple[int, int] | None:
        """The span of message j's content in the full render, from a render with only j replaced."""
        sentinel = rendered.sentinel(j)
        if text is None or text.count(sentinel) != 1:
            return None
        before, after = text.split(sentinel)
        full = rendered.text
        if full.startswith(before) and full.endswith(after) and len(before) + len(after) <= len(full):
            return len(before), len(full) - len(after)
        return None

    def _turn_start(self, rendered: _Render, i: int, prompt: str | None) -> int | None:
        """Where assistant turn i starts: after the conversation's prompt for it (`prompt`, the render
        of the messages before it with the generation prompt) where the full render continues that
        prompt, else after the text the template writes after the previous message's content."""
        full, contents = rendered.text, rendered.contents
        if prompt is not None and full.startswith(prompt):
            return len(prompt)
        if i - 1 not in contents:
            return None
        before = rendered.messages[: i - 1] + [rendered.with_sentinel(i - 1)]
        tail = self._after(self._render_each([before], True, rendered.tools)[0], rendered.sentinel(i - 1))
        anchor = contents[i - 1][1]
        return anchor + len(tail) if tail is not None and full.startswith(tail, anchor) else None

    def _turn_end(self, rendered: _Render, i: int, turn: str | None) -> int | None:
        """Where assistant turn i ends: at the end of the full render for the last message; at the end
        of `turn` (the render of the messages through it) where the full render continues it; else
        where the text the template writes before the next message's content begins."""
        full, contents = rendered.text, rendered.contents
        if i == len(rendered.messages) - 1:
            return len(full)
        if turn is not None and full.startswith(turn):
            return len(turn)
        opening = self._opening(rendered, i) if i + 1 in contents else None
        if opening is None or not full.startswith(opening, contents[i + 1][0] - len(opening)):
            return None
        return contents[i + 1][0] - len(opening)

    def _opening(self, rendered: _Render, i: int) -> str | None:
        """The text the template writes before the content of message i + 1 when assistant turn i precedes it.

        Rendered with a plain assistant turn i: the text between its content and the next message's,
        less what the template writes after that turn when it is the last message (its closing).
        """
        turn = {"role": "assistant", "content": rendered.sentinel(i)}
        before = rendered.messages[:i] + [turn]
        pair, alone = self._render_each(
            [before + [rendered.with_sentinel(i + 1)], before], False, rendered.tools
        )
        between = self._after(pair, rendered.sentinel(i))
        closing = self._after(alone, rendered.sentinel(i))
        if between is None or closing is None or between.count(rendered.sentinel(i + 1)) != 1:
            return None
        between = between.split(rendered.sentinel(i + 1))[0]
        # token by token: "<|end|>\n<|user|>" and "<|end|>\n<|endoftext|>" share "<|end|>\n", not "<|"
        ours, theirs = (self._backend.encode(t, add_special_tokens=False) for t in (between, closing))
        shared = len(os.path.commonprefix([ours.ids, theirs.ids]))
        return between[ours.offsets[shared - 1][1] if shared else 0 :]

    @staticmethod
    def _after(text: str | None, sentinel: str) -> str | None:
        """What follows the one occurrence of `sentinel` in `text`."""
        if text is None or text.count(sentinel) != 1:
            return None
        return text.split(sentinel)[1]


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
