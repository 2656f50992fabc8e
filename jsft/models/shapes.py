"""Architectures of well-known models, to plan a run before their weights (or config.json) are here.

Each entry holds the fields of the model's published `config.json` that `ModelConfig.from_hf` reads
(copied from the Hugging Face model pages); the Instruct variants share their base model's shapes.
"""

from __future__ import annotations

import json
import os

import huggingface_hub
from huggingface_hub.utils import HFValidationError

from jsft.errors import ModelFolderError

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

LLAMA_31_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}

LLAMA_31_70B = {
    **LLAMA_31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

LLAMA_32_1B = {
    **LLAMA_31_8B,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "head_dim": 64,
    "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
    "tie_word_embeddings": True,
}

LLAMA_32_3B = {
    **LLAMA_32_1B,
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "head_dim": 128,
}

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
}

MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.02,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "tie_word_embeddings": False,
}

KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B": LLAMA_31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA_31_8B,
    "meta-llama/Llama-3.1-70B": LLAMA_31_70B,
    "meta-llama/Llama-3.1-70B-Instruct": LLAMA_31_70B,
    "meta-llama/Llama-3.2-1B": LLAMA_32_1B,
    "meta-llama/Llama-3.2-1B-Instruct": LLAMA_32_1B,
    "meta-llama/Llama-3.2-3B": LLAMA_32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": LLAMA_32_3B,
    "Qwen/Qwen3-30B-A3B": QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B-Base": QWEN3_30B_A3B,
    "mistralai/Mixtral-8x7B-v0.1": MIXTRAL_8X7B,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": MIXTRAL_8X7B,
}


def hf_config(path: str, revision: str = "") -> tuple[dict, str]:
    """(config.json of `model.path`, where it came from): a local folder, the Hugging Face cache, or
    `KNOWN_CONFIGS`. Never reads weights and never uses the network."""
    if os.path.isdir(path):
        return _read(os.path.join(path, "config.json")), f"{path}/config.json"
    try:
        cached = huggingface_hub.try_to_load_from_cache(path, "config.json", revision=revision or None)
    except HFValidationError:
        raise ModelFolderError(f"model folder {path} does not exist, and it is not a Hub id") from None
    if isinstance(cached, str):
        return _read(cached), f"{cached} (Hugging Face cache)"
    if path in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[path]), f"jsft's shape table (jsft/models/shapes.py) for {path}"
    raise ModelFolderError(
        f"no config.json for {path}: not a local folder, not in the Hugging Face cache, and not one of the "
        f"known models ({', '.join(KNOWN_CONFIGS)}); download its config.json first"
    )


def _read(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"cannot read {file}: {e}") from None
