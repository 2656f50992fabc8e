"""Shared fixtures: tiny random Hugging Face models made with transformers, and paths."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
TINY_MODEL = ROOT / "tools" / "tiny" / "model"
TINY_DATA = ROOT / "tools" / "tiny" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test sees 8 CPU devices, so the default mesh shards for real; single-device tests ask for one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def make_hf_llama(folder: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    """Saves a tiny random Llama with odd sizes (catches transposes) and GQA into `folder`."""
    import torch
    import transformers

    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    config = transformers.LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to exactly 1; perturb them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> pathlib.Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf_llama"))
