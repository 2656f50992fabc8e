"""Generate the tiny, fully local assets that jsft's tests and smoke runs train on.

Real checkpoints are too big for CI and unit tests, and a random model on random data cannot show that
training works. This script produces a task that a ~1M-parameter transformer visibly learns in a few
minutes on 2 CPU cores, plus a real Hugging Face model folder, so the whole pipeline (HF tokenizer and
chat template, safetensors weights, JSONL chat data) is exercised without any network access.

Outputs, written beside this file:

* ``data/train.jsonl`` and ``data/held_out.jsonl``: one ``{"messages": [...]}`` object per line.
  Each user turn asks for one simple transform (``reverse: hello`` -> ``olleh``; also ``upper``,
  ``sort``, ``count`` and ``add: 12 + 7``). About 30% of conversations open with a system message and
  about 25% have two user/assistant exchanges. Held-out operands (words and number pairs) never occur in
  train, so held-out accuracy measures generalisation rather than memorisation.
* ``model/``: a byte-level BPE tokenizer (every letter and digit its own token, 263 entries; tulu-style
  chat template with special-token headers and a leading BOS) and a randomly initialised 4-layer Llama
  (vocabulary padded to 384) saved as a single ``model.safetensors`` with ``config.json`` and
  ``generation_config.json``. Operand words have 3-5 letters.

Everything is seeded, so rerunning gives byte-identical data files. Regenerate with::

    python tools/tiny/make_tiny.py
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
MODEL_DIR = HERE / "model"

SEED = 1234
N_TRAIN = 20_000
N_HELD_OUT = 500
P_SYSTEM = 0.30
P_TWO_TURN = 0.25
# Share of unordered number pairs reserved for held-out (~250 pairs, ~500 ordered ones).
HELD_OUT_FRACTION = 0.05
WORD_LENGTH = 5  # longest operand of the word tasks

VOCAB_SIZE = 384
MODEL_MAX_LENGTH = 2048
SPECIAL_TOKENS = ["<|pad|>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = [
    "You transform strings.",
    "Answer with the result only.",
    "You are a tiny calculator.",
    "Be brief.",
]

Message = dict[str, str]
Conversation = list[Message]
# A task turns an operand into (user prompt, assistant answer).
Task = Callable[[str], tuple[str, str]]


def _word_task(name: str, fn: Callable[[str], str]) -> Task:
    """Build a task over lowercase words, so every word task shares one prompt format."""
    return lambda word: (f"{name}: {word}", fn(word))


def _add(pair: str) -> tuple[str, str]:
    """Number pairs are stored as ``"a,b"`` strings so they can be sorted and split like words."""
    a, b = (int(x) for x in pair.split(","))
    return f"add: {a} + {b}", str(a + b)


WORD_TASKS: dict[str, Task] = {
    "reverse": _word_task("reverse", lambda w: w[::-1]),
    "upper": _word_task("upper", str.upper),
    "sort": _word_task("sort", lambda w: "".join(sorted(w))),
    "count": _word_task("count", lambda w: str(len(w))),
}


def random_word(rng: random.Random) -> str:
    """A random 3-5 letter lowercase string; random letters keep the task about the transform, not words.
    Up to 5 letters, so the default run's 600 steps see each task's outputs often enough to learn them."""
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, WORD_LENGTH)))


def split_number_pairs(rng: random.Random) -> tuple[list[str], list[str]]:
    """Split all unordered pairs of 0-99 into train/held-out, so ``a + b`` and ``b + a`` stay together."""
    unordered = [(a, b) for a in range(100) for b in range(a, 100)]
    rng.shuffle(unordered)
    n_held = int(len(unordered) * HELD_OUT_FRACTION)

    def both_orders(pairs: list[tuple[int, int]]) -> list[str]:
        return sorted({f"{a},{b}" for x, y in pairs for a, b in ((x, y), (y, x))})

    return both_orders(unordered[n_held:]), both_orders(unordered[:n_held])


def held_out_words(rng: random.Random, n: int) -> set[str]:
    """Reserve a fixed set of words for held-out rows; train rejects them when sampling."""
    words: set[str] = set()
    while len(words) < n:
        words.add(random_word(rng))
    return words


def sample_turn(
    rng: random.Random, pairs: list[str], word_source: Callable[[], str]
) -> tuple[Message, Message]:
    """One user/assistant exchange; addition gets 1/5 of turns like each word task."""
    task = rng.choice([*WORD_TASKS, "add"])
    prompt, answer = _add(rng.choice(pairs)) if task == "add" else WORD_TASKS[task](word_source())
    return {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}


def sample_conversation(rng: random.Random, pairs: list[str], word_source: Callable[[], str]) -> Conversation:
    """A conversation with an optional system prompt and one or two exchanges."""
    messages: Conversation = []
    if rng.random() < P_SYSTEM:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < P_TWO_TURN else 1):
        messages.extend(sample_turn(rng, pairs, word_source))
    return messages


def make_datasets() -> tuple[list[Conversation], list[Conversation]]:
    """Sample train and held-out conversations whose operands (words, number pairs) are disjoint."""
    rng = random.Random(SEED)
    train_pairs, held_pairs = split_number_pairs(rng)
    held_words_set = held_out_words(rng, N_HELD_OUT * 2)
    held_words = sorted(held_words_set)  # sorted: set iteration order is not stable across runs

    def train_word() -> str:
        while (word := random_word(rng)) in held_words_set:
            pass
        return word

    train = [sample_conversation(rng, train_pairs, train_word) for _ in range(N_TRAIN)]
    held = [sample_conversation(rng, held_pairs, lambda: rng.choice(held_words)) for _ in range(N_HELD_OUT)]
    return train, held


def write_jsonl(path: Path, rows: list[Conversation]) -> None:
    """Write with fixed key order and ``\\n`` endings so reruns are byte-identical on every platform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def message_texts(rows: list[Conversation]) -> Iterator[str]:
    """Message contents only: BPE training must not see the special-token header strings as text."""
    for messages in rows:
        for message in messages:
            yield message["content"]


def build_tokenizer(rows: list[Conversation]) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE so the model exercises a real HF tokenizer with merges and specials."""
    tok = Tokenizer(models.BPE())
    # Every letter and every digit is its own token: the tasks act on letters and digits, and a model
    # whose tokens merge letters (`oq`, or ` d` with the space before a word) has to learn the
    # transforms once per merged piece. With letters BPE trains on the rest of the text; its merges
    # (` +`) and the special tokens still exercise a real tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[A-Za-z]"), "isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(message_texts(rows), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=MODEL_MAX_LENGTH,
        # The chat template already emits BOS; adding one during tokenization would double it.
        add_bos_token=False,
        add_eos_token=False,
        # Keep decode(encode(x)) == x; the cleanup heuristic rewrites spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A ~0.8M-parameter Llama with GQA and untied embeddings, to cover the real checkpoint layout."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,  # above the tokenizer's 263 entries: real checkpoints pad their vocabulary
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    return model


def main() -> None:
    train, held = make_datasets()
    write_jsonl(DATA_DIR / "train.jsonl", train)
    write_jsonl(DATA_DIR / "held_out.jsonl", held)
    tok = build_tokenizer(train)
    tok.save_pretrained(MODEL_DIR)
    build_model(tok).save_pretrained(MODEL_DIR, safe_serialization=True)
    print(f"wrote {len(train)} train / {len(held)} held-out rows to {DATA_DIR}, model to {MODEL_DIR}")


if __name__ == "__main__":
    main()
