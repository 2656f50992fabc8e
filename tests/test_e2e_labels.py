"""Real conversations through the whole data path and the steps, against transformers' `labels=` loss.

`data.prepare` encodes a JSONL file of conversations, `data.batches` packs them into rows, and the
train and eval steps score the packed rows. The reference is the torch model loaded from the same
folder, run on each conversation alone (un-packed) with HF labels built from its encoded ids and
labels; its per-conversation mean times the trained-token count, summed, divided by all trained tokens,
is the token-weighted mean the steps must reproduce (float32, 1e-5).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import REALDATA, TINY_DATA, TINY_MODEL, gradient_recorder

from jsft import data, models, sharding
from jsft.config import default_config
from jsft.trainer import Trainer

IGNORE = -100


def _tiny_case(tmp_path):
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()[:40]]
    return TINY_MODEL, rows


def _qwen_case(tmp_path):
    """The real Qwen2.5 tokenizer and ChatML template (with system default), multi-turn ShareGPT
    conversations; a random tiny Qwen2 with the tokenizer's vocabulary stands in for the model."""
    tokenizer_dir = REALDATA / "tokenizers" / "qwen2.5-instruct"
    if not tokenizer_dir.is_dir():
        pytest.skip(f"{REALDATA} is absent")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = tmp_path / "qwen"
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    shared = json.loads((REALDATA / "datasets" / "fastchat" / "dummy_conversation.json").read_text())
    rows = [
        {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]}
        for row in shared[:16]
    ]
    return folder, rows


CASES = {"tiny_llama": _tiny_case, "qwen2.5_tokenizer": _qwen_case}


def _hf_loss_sum(model, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(summed token loss, trained tokens) of one conversation by transformers' own `labels=` loss."""
    with torch.no_grad():
        out = model(
            torch.tensor(ids[None], dtype=torch.long), labels=torch.tensor(labels[None], dtype=torch.long)
        )
    trained = int((labels[1:] != IGNORE).sum())  # HF shifts the labels itself
    return float(out.loss) * trained, trained


@pytest.mark.parametrize("case", list(CASES))
def test_packed_steps_equal_transformers_labels_loss(case, tmp_path):
    folder, rows = CASES[case](tmp_path)
    source = tmp_path / "conversations.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = default_config()
    cfg.data.mixer = ((str(source), len(rows)),)
    cfg.data.max_seq_length = 256
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.num_proc = 1
    cfg.optim.warmup_ratio = 0.0
    encoded = data.prepare(cfg.data, tokenizer, seed=0)
    assert len(encoded) == len(rows), encoded.stats

    # The prepared rows are `encode_messages` of the conversations (in the mixer's order).
    direct = sorted(tuple(data.encode_messages(r["messages"], tokenizer, 256)["input_ids"]) for r in rows)
    conversations = []
    for i in range(len(encoded)):
        start, end = int(encoded.row_starts[i]), int(encoded.row_starts[i + 1])
        ids = np.asarray(encoded.token_ids[start:end], np.int64)
        conversations.append((ids, np.where(encoded.trained[start:end], ids, IGNORE)))
    assert sorted(tuple(ids) for ids, _ in conversations) == direct

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    per_conversation = [_hf_loss_sum(torch_model, ids, labels) for ids, labels in conversations]
    hf_sum = sum(s for s, _ in per_conversation)
    hf_tokens = sum(n for _, n in per_conversation)
    assert hf_tokens == encoded.trained_tokens > 0

    mesh = sharding.single_device_mesh()
    model_cfg, _ = models.config_from_folder(str(folder))
    trainer = Trainer(cfg, models.Layout(model_cfg), mesh, total_steps=1, optimizer=gradient_recorder())
    state = trainer.fresh_state(models.load_params(str(folder), trainer.layout, mesh))
    packed = list(
        data.batches(
            encoded.examples,
            batch_size=4,
            max_seq_length=256,
            packing=True,
            seed=0,
            shuffle=False,
            num_epochs=1,
        )
    )
    assert any(int(b["segment_ids"].max()) > 1 for b in packed)  # rows really hold several conversations
    assert trainer.evaluate(state, packed) == pytest.approx(hf_sum / hf_tokens, rel=1e-5)

    step_sum, step_tokens = 0.0, 0
    for batch in packed:  # the recorder leaves the parameters as they are
        state, metrics = trainer.train_step(state, trainer.device_batch(batch))
        step_sum += float(metrics["loss"]) * int(metrics["trained_tokens"])
        step_tokens += int(metrics["trained_tokens"])
    assert step_tokens == hf_tokens
    assert step_sum / step_tokens == pytest.approx(hf_sum / hf_tokens, rel=1e-5)
    assert jax.device_get(state.step) == len(packed)
