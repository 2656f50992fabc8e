"""RoPE scalings (yarn, dynamic NTK, longrope) against transformers' own, past the original context.

Logits of tiny random models in float32 (ATOL), and the inverse frequencies and attention factors of
`transformers.modeling_rope_utils` for the config.json fallbacks the models do not exercise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_family, make_hf_llama
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jsft import models
from jsft.errors import UnsupportedModelError
from jsft.models.config import ModelConfig
from jsft.models.rope import rope_frequencies

ATOL = 1e-4
ORIGINAL = 32  # the original context of every scaled model here; long rows are 80 tokens
LONG, SHORT = 80, 24
# Logits of about +-6 instead of +-0.5: leaving out YaRN's attention factor then moves them by 1.9-3.8,
# no scaling at all by 7-9, while jsft stays within 1.3e-5 of transformers.
LARGE_INIT = {"initializer_range": 0.2}

_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.3, 2.1, 3.4],  # head_dim 8: 4 frequencies
    "long_factor": [1.1, 2.5, 6.0, 11.0],
    "original_max_position_embeddings": ORIGINAL,
}
LLAMA_ROPES = {
    # theta 100 puts YaRN's ramp inside the 4 frequencies of head_dim 8, so all three regions show
    "yarn_ramp": dict(_YARN, rope_theta=100.0, beta_fast=2.0, beta_slow=0.5, truncate=False),
    "yarn_mscale": dict(_YARN, rope_theta=100.0, factor=8.0, mscale=1.0, mscale_all_dim=0.5),
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0},
    "longrope": dict(_LONGROPE, rope_theta=100.0),
}


def _hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _max_diff_per_length(folder, hf_model_of, lengths) -> dict[int, float]:
    """{length: max |jsft - transformers| logit} for a 2-row batch of each length; a fresh transformers
    model per batch, since its dynamic RoPE keeps state between calls (jsft's is per batch)."""
    model = models.load_pretrained(str(folder))
    diffs = {}
    for length in lengths:
        ids = np.random.default_rng(length).integers(1, 97, (2, length))
        expected = _hf_logits(hf_model_of(), ids)
        diffs[length] = float(np.abs(np.asarray(model(ids.astype(np.int32))) - expected).max())
    return diffs


@pytest.mark.parametrize("name", list(LLAMA_ROPES))
def test_llama_scalings_match_transformers(tmp_path, name):
    """Rows of 80 tokens on a 32-token original context; dynamic and longrope also at 24, where they
    keep the original base and the short factors."""
    max_positions = ORIGINAL if name == "dynamic" else 128  # longrope: factor 4, so attention factor 1.18
    folder = make_hf_llama(
        tmp_path / name,
        max_position_embeddings=max_positions,
        rope_parameters=LLAMA_ROPES[name],
        **LARGE_INIT,
    )
    lengths = (LONG, SHORT) if name in ("dynamic", "longrope") else (LONG,)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()

    diffs = _max_diff_per_length(folder, load, lengths)
    print(f"{name}: max |logit diff| per row length {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


def test_qwen2_yarn_matches_transformers(tmp_path):
    rope = dict(_YARN, rope_theta=1e4)  # default betas, truncated ramp, attention factor from `factor`
    hf_model = make_hf_family(tmp_path / "qwen2", "qwen2", max_position_embeddings=128, rope_parameters=rope)
    diffs = _max_diff_per_length(tmp_path / "qwen2", lambda: hf_model, (LONG,))
    print(f"qwen2 yarn: max |logit diff| {diffs}")
    assert diffs[LONG] <= ATOL, diffs


def test_longrope_picks_by_the_longest_sequence_of_the_batch(tmp_path):
    """A packed row longer than the original context whose sequences are all shorter uses the short
    factors, as transformers does for each sequence alone (it takes the largest position id + 1)."""
    folder = make_hf_llama(
        tmp_path / "m", max_position_embeddings=128, rope_parameters=LLAMA_ROPES["longrope"], **LARGE_INIT
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    rng = np.random.default_rng(5)
    a, b = rng.integers(1, 97, 30), rng.integers(1, 97, 28)
    packed = np.concatenate([a, b])[None].astype(np.int32)
    segment_ids = np.array([[1] * 30 + [2] * 28], np.int32)
    positions = np.array([list(range(30)) + list(range(28))], np.int32)
    got = np.asarray(
        models.load_pretrained(str(folder))(packed, positions=positions, segment_ids=segment_ids)
    )
    np.testing.assert_allclose(got[0, :30], _hf_logits(hf_model, a[None])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[0, 30:], _hf_logits(hf_model, b[None])[0], atol=ATOL, rtol=0)


_LLAMA_SIZES = dict(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096)  # head_dim 64


@pytest.mark.parametrize(
    "top_level, rope, seq_len",
    [
        ({}, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256}, 0),
        # factor and original context from max_position_embeddings, as transformers fills them
        (
            {},
            {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024, "beta_fast": 16},
            0,
        ),
        ({}, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.9}, 0),
        ({}, {"rope_type": "dynamic", "factor": 3.0}, 10_000),
        ({}, {"rope_type": "dynamic", "factor": 3.0}, 100),
        # Phi-3 files keep the original context at the top level
        ({"original_max_position_embeddings": 1024}, {"rope_type": "longrope"}, 1025),
        ({"original_max_position_embeddings": 1024}, {"rope_type": "longrope"}, 1024),
    ],
)
def test_frequencies_and_attention_factor_match_transformers(top_level, rope, seq_len):
    if rope["rope_type"] == "longrope":
        rope = dict(rope, short_factor=list(np.linspace(1, 2, 32)), long_factor=list(np.linspace(1, 40, 32)))
    config = transformers.LlamaConfig(**_LLAMA_SIZES, rope_parameters=dict(rope, rope_theta=5e5))
    for key, value in top_level.items():
        setattr(config, key, value)
    hf_config = dict(config.to_dict(), **top_level)
    if rope.get("factor", 1) is None:  # transformers' validation leaves null out of to_dict's rope dict
        hf_config["rope_parameters"]["factor"] = None
    expected, expected_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, seq_len=seq_len or None)
    cfg = ModelConfig.from_hf(hf_config)
    got = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq_len)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6, atol=0)
    assert cfg.rope_scaling.attention_factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "dynamic"}, "rope_scaling type 'dynamic' needs 'factor'"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 4}, "needs 'long_factor'"),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4},
            r"short_factor in config.json must be a list of head_dim / 2 = 4 numbers",
        ),
        ({"rope_type": "mrope", "mrope_section": [1, 1, 2]}, "unsupported rope_scaling type 'mrope'"),
    ],
)
def test_settings_that_cannot_be_honoured_are_one_line_errors(rope, message):
    hf_config = transformers.LlamaConfig(**dict(_LLAMA_SIZES, hidden_size=32)).to_dict()
    hf_config["rope_parameters"] = dict(rope, rope_theta=1e4)
    with pytest.raises(UnsupportedModelError, match=message) as error:
        ModelConfig.from_hf(hf_config)
    assert "\n" not in str(error.value)
