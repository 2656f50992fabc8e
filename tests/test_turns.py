"""Assistant turns located in the full render: templates that rewrite history, tools and reasoning.

The templates here are written for these tests. `QWEN3_LIKE` behaves as the design notes describe
Qwen3's: assistant turns before the last user message lose their reasoning, later ones get a
`<think>` block (empty when there is no reasoning), tool results are user turns, tool calls are
JSON lines after the content, and a tools preamble is inserted. `REWRITER` changes earlier turns
another way: it counts the messages in a first line, upper-cases assistant turns before the last
user message and moves the system prompt into the last user message.

Each test computes the expected trained span of every turn from the full render by plain string
search, maps it to tokens with the tokenizer's offsets, and compares label by label.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from conftest import TINY_MODEL

from jsft.data import ChatEncoder
from jsft.data.masking import IGNORE
from jsft.errors import BadRow

QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}{{- '<|im_start|>system\\n# Tools\\n' -}}"
    "{%- for t in tools -%}{{- t | tojson -}}{{- '\\n' -}}{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content or '' -%}{%- set reasoning = m.reasoning_content or '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- content -}}"
    "{%- for call in m.tool_calls or [] -%}"
    "{{- '\\n<tool_call>\\n' -}}"
    "{{- {'name': call.function.name, 'arguments': call.function.arguments} | tojson -}}"
    "{{- '\\n</tool_call>' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

REWRITER = (
    "{{- 'Messages: ' + (messages | length) | string + '\\n' -}}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '[INST] ' -}}"
    "{%- if loop.index0 == ns.last_user and messages[0].role == 'system' -%}"
    "{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- m.content + ' [/INST]' -}}"
    "{%- elif m.role == 'assistant' and loop.index0 < ns.last_user -%}"
    "{{- ' ' + m.content | upper + '</s>' -}}"
    "{%- elif m.role == 'assistant' -%}{{- ' ' + m.content + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Assistant turns before the last message get a countdown in their header: no prompt ends where they start.
COUNTDOWN = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- if not loop.last -%}{{- '(' + (messages | length - loop.index0) | string + ' left)' -}}{%- endif -%}"
    "{{- '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|' + m.role + '|>\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris", "reasoning_content": "France's capital is Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid", "reasoning_content": "Spain's capital is Madrid."},
]

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

TOOL_USE = [
    {"role": "system", "content": "You can check the weather."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "content": "18 C, sunny"},
    {
        "role": "assistant",
        "content": "It is 18 C and sunny in Paris.",
        "reasoning_content": "Read the result.",
    },
]


@pytest.fixture(scope="module")
def tok():
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tokenizer


def expected_labels(tok, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], np.ndarray]:
    """Token ids of `full` and labels training exactly the tokens inside the character spans."""
    encoding = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = np.full(len(ids), IGNORE, np.int32)
    for k, (start, end) in enumerate(encoding["offset_mapping"]):
        if any(begin <= start and end <= finish for begin, finish in spans):
            labels[k] = ids[k]
    for begin, finish in spans:  # every span is made of whole tokens
        assert begin in [s for s, _ in encoding["offset_mapping"]] and finish in [
            e for _, e in encoding["offset_mapping"]
        ]
    return ids, labels


def chatml_turn_spans(full: str) -> list[tuple[int, int]]:
    """From after each assistant header through the <|im_end|>\\n that closes the turn."""
    header, closing = "<|im_start|>assistant\n", "<|im_end|>\n"
    spans, at = [], full.find(header)
    while at >= 0:
        start = at + len(header)
        spans.append((start, full.index(closing, start) + len(closing)))
        at = full.find(header, start)
    return spans


def trained_texts(tok, encoded) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


def assert_exact(tok, encoded, full: str, spans) -> None:
    ids, labels = expected_labels(tok, full, spans)
    np.testing.assert_array_equal(encoded["input_ids"], ids)
    np.testing.assert_array_equal(encoded["labels"], labels)


def test_qwen3_like_template_trains_every_turn_as_the_full_render_has_it(tok):
    encoder = ChatEncoder(tok, QWEN3_LIKE)
    full = tok.apply_chat_template(TWO_TURNS, chat_template=QWEN3_LIKE, tokenize=False)
    assert "France's capital" not in full and "<think>\nSpain's capital is Madrid.\n</think>" in full
    encoded = encoder.encode(TWO_TURNS)
    assert_exact(tok, encoded, full, chatml_turn_spans(full))
    assert trained_texts(tok, encoded) == [
        "Paris<|im_end|>\n",
        "<think>\nSpain's capital is Madrid.\n</think>\n\nMadrid<|im_end|>\n",
    ]
    assert encoded["untrained_turns"] == {}
    # The prefix method cannot: the render through the first turn shows a <think> block the full render lacks.
    with pytest.raises(BadRow, match="not a token prefix"):
        encoder.encode_incremental(TWO_TURNS)


def test_qwen3_like_reasoning_inside_the_content_and_an_empty_think_block(tok):
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    full = tok.apply_chat_template(messages, chat_template=QWEN3_LIKE, tokenize=False)
    encoded = ChatEncoder(tok, QWEN3_LIKE).encode(messages)
    assert_exact(tok, encoded, full, chatml_turn_spans(full))
    assert trained_texts(tok, encoded) == ["4<|im_end|>\n", "<think>\n\n</think>\n\n6<|im_end|>\n"]
    last_only = ChatEncoder(tok, QWEN3_LIKE, train_on="last_assistant_turn").encode(messages)
    assert trained_texts(tok, last_only) == ["<think>\n\n</think>\n\n6<|im_end|>\n"]


def test_tool_calls_tool_results_reasoning_and_text_parts(tok):
    encoder = ChatEncoder(tok, QWEN3_LIKE)
    encoded = encoder.encode(TOOL_USE, json.dumps(WEATHER_TOOLS))
    normalised = [dict(m) for m in TOOL_USE]
    normalised[1]["content"] = "Weather in Paris?"
    normalised[2] = {
        "role": "assistant",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    }
    full = tok.apply_chat_template(normalised, tools=WEATHER_TOOLS, chat_template=QWEN3_LIKE, tokenize=False)
    assert '"name": "get_weather"' in full and "18 C, sunny" in full and "# Tools" in full
    assert_exact(tok, encoded, full, chatml_turn_spans(full))
    assert trained_texts(tok, encoded) == [
        '<think>\n\n</think>\n\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n",
        "<think>\nRead the result.\n</think>\n\nIt is 18 C and sunny in Paris.<|im_end|>\n",
    ]
    untrained = tok.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label == IGNORE]
    )
    assert "18 C, sunny" in untrained and "<tool_response>" in untrained and "get_weather" in untrained


def test_rewriter_uppercases_earlier_turns_and_moves_the_system_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}] + [
        {k: v for k, v in m.items() if k != "reasoning_content"} for m in TWO_TURNS
    ]
    full = tok.apply_chat_template(messages, chat_template=REWRITER, tokenize=False)
    assert full.startswith("Messages: 5\n") and "PARIS" in full and "Be brief.\n\nAnd of Spain?" in full
    encoded = ChatEncoder(tok, REWRITER).encode(messages)
    spans = [
        (full.index(" PARIS"), full.index(" PARIS") + len(" PARIS</s>")),
        (full.index(" Madrid"), len(full)),
    ]
    assert_exact(tok, encoded, full, spans)
    assert trained_texts(tok, encoded) == [" PARIS</s>", " Madrid</s>"]


def test_unlocated_turns_drop_the_row_or_are_counted(tok):
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    with pytest.raises(BadRow) as error:
        ChatEncoder(tok, COUNTDOWN).encode(messages)
    assert error.value.reason == "turn_not_located"
    encoded = ChatEncoder(tok, COUNTDOWN, on_unlocated_turn="train_located").encode(messages)
    assert encoded["untrained_turns"] == {"turn_not_located": 1}
    assert trained_texts(tok, encoded) == ["second<|im_end|>\n"]


@pytest.mark.parametrize(
    "messages, reason",
    [
        (  # the built-in chatml template writes no tool calls
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": TOOL_USE[2]["tool_calls"]},
            ],
            "tool_calls_not_rendered",
        ),
        (  # the tulu template skips tool messages
            [
                {"role": "user", "content": "hi"},
                {"role": "tool", "content": "42"},
                {"role": "assistant", "content": "ok"},
            ],
            "message_not_rendered",
        ),
        (
            [
                {"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                {"role": "assistant", "content": "a"},
            ],
            "non_text_content",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": {}}]}],
            "bad_tool_calls",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "non_string_content"),
    ],
)
def test_rows_a_template_cannot_render_are_counted_drops(tok, messages, reason):
    template = "chatml" if reason == "tool_calls_not_rendered" else "tulu"
    with pytest.raises(BadRow) as error:
        ChatEncoder(tok, template).encode(messages)
    assert error.value.reason == reason


def test_columnar_nulls_are_not_rendered(tok):
    """Parquet and Hub rows give every message every key, None where absent."""
    messages = [
        {"role": "user", "content": "hi", "tool_calls": None, "reasoning_content": None},
        {"role": "assistant", "content": "yo", "tool_calls": [], "reasoning_content": None},
    ]
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    encoder = ChatEncoder(tok, QWEN3_LIKE)
    np.testing.assert_array_equal(encoder.encode(messages)["labels"], encoder.encode(plain)["labels"])
