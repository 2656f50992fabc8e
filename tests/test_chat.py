"""Assistant-only masking with real tokenizers: exactly the assistant turns are trained."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from conftest import REALDATA, TINY_MODEL

from jsft.data import encode_messages
from jsft.data.masking import IGNORE
from jsft.data.templates import TULU_TEMPLATE
from jsft.errors import BadRow

CONVERSATION = [
    {"role": "system", "content": "You transform strings."},
    {"role": "user", "content": "reverse: hello"},
    {"role": "assistant", "content": "olleh"},
    {"role": "user", "content": "add: 2 + 40"},
    {"role": "assistant", "content": "42"},
]


def _trained_spans(encoded) -> list[list[int]]:
    """Maximal runs of trained positions, as token lists."""
    spans, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            current.append(int(token))
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL)


def test_tiny_template_trains_exactly_the_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    encoded = encode_messages(CONVERSATION, tok)
    assert encoded["input_ids"].dtype == np.int32 and encoded["labels"].dtype == np.int32
    # Each assistant turn trains its content, the eos and the newline the template puts after it.
    expected = [tok.encode(text + tok.eos_token + "\n", add_special_tokens=False) for text in ("olleh", "42")]
    assert _trained_spans(encoded) == expected
    # exactly one BOS, at the start (no double BOS from template + tokenizer)
    assert (
        list(encoded["input_ids"]).count(tok.bos_token_id) == 1
        and encoded["input_ids"][0] == tok.bos_token_id
    )
    # every untrained token is the rendering of the non-assistant parts
    untrained = tok.decode(
        [t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab == IGNORE]
    )
    assert "olleh" not in untrained and "hello" in untrained and "<|assistant|>" in untrained


def test_truncation_keeps_the_prefix(tiny_tokenizer):
    full = encode_messages(CONVERSATION, tiny_tokenizer)
    cut = encode_messages(CONVERSATION, tiny_tokenizer, max_seq_length=20)
    assert len(cut["input_ids"]) == 20
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:20])
    np.testing.assert_array_equal(cut["labels"], full["labels"][:20])


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "empty"),
        (None, "empty"),
        ([{"role": "user", "content": "hi"}], "no_assistant"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "bad_role"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "non_string_content"),
    ],
)
def test_bad_rows_name_their_reason(tiny_tokenizer, messages, reason):
    with pytest.raises(BadRow) as err:
        encode_messages(messages, tiny_tokenizer)
    assert err.value.reason == reason


@pytest.mark.skipif(not (REALDATA / "tokenizers" / "olmo2-tulu").is_dir(), reason="../shared/realdata absent")
def test_builtin_tulu_template_matches_the_published_one_on_olmo2():
    tok = transformers.AutoTokenizer.from_pretrained(REALDATA / "tokenizers" / "olmo2-tulu")
    for n in range(1, len(CONVERSATION) + 1):
        for prompt in (False, True):
            published = tok.apply_chat_template(
                CONVERSATION[:n], tokenize=False, add_generation_prompt=prompt
            )
            ours = tok.apply_chat_template(
                CONVERSATION[:n], tokenize=False, add_generation_prompt=prompt, chat_template=TULU_TEMPLATE
            )
            assert ours == published
    encoded = encode_messages(CONVERSATION, tok, chat_template="tulu")
    eos = tok.eos_token
    assert [tok.decode(s) for s in _trained_spans(encoded)] == ["olleh" + eos, "42" + eos]


@pytest.mark.skipif(
    not (REALDATA / "tokenizers" / "qwen2.5-instruct").is_dir(), reason="../shared/realdata absent"
)
def test_chatml_on_qwen_tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(REALDATA / "tokenizers" / "qwen2.5-instruct")
    encoded = encode_messages(CONVERSATION, tok, chat_template="chatml")
    assert [tok.decode(s) for s in _trained_spans(encoded)] == ["olleh<|im_end|>\n", "42<|im_end|>\n"]
