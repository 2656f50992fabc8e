"""Shared fixtures: tiny random Hugging Face models made with transformers, and paths."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
TINY_MODEL = ROOT / "tools" / "tiny" / "model"
TINY_DATA = ROOT / "tools" / "tiny" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX on the CPU for every test and every process a test starts: with libtpu installed (the TPU program
# tests), a JAX without this would load libtpu, take its machine-wide lock and warn on stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every test sees 8 CPU devices, so the default mesh shards for real; single-device tests ask for one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


@pytest.fixture(scope="session", autouse=True)
def isolated_data_cache(tmp_path_factory):
    """Encoded data goes to a fresh folder per test session (inherited by the runs tests start), never
    to the user's ~/.cache/jsft/data, where stale encodings from another checkout could be reused."""
    previous = os.environ.get("JSFT_CACHE")
    os.environ["JSFT_CACHE"] = str(tmp_path_factory.mktemp("jsft_cache"))
    yield os.environ["JSFT_CACHE"]
    if previous is None:
        os.environ.pop("JSFT_CACHE")
    else:
        os.environ["JSFT_CACHE"] = previous


def small_model_config(**changes):
    """A 4-layer GQA Llama ModelConfig (hidden 64, heads 4/2 of 16) for step and attention tests."""
    import dataclasses

    from jsft.models import ModelConfig

    small = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
    )
    return dataclasses.replace(small, **changes)


def tiny_run_args(output_dir, train_rows: int, eval_rows: int = 0) -> list[str]:
    """The tiny config's command-line arguments for a short test run: output in `output_dir`, the first
    `train_rows` training conversations, `eval_rows` held-out ones (0: no held-out set)."""
    held_out = f"(('{TINY_DATA}/held_out.jsonl', {eval_rows}),)" if eval_rows else "()"
    return [
        f"--config={ROOT}/configs/tiny.py",
        f"--config.output_dir={output_dir}",
        f"--config.data.mixer=(('{TINY_DATA}/train.jsonl', {train_rows}),)",
        f"--config.data.eval_mixer={held_out}",
    ]


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


# Tiny configs per family: GQA, sizes that differ from each other (catch transposes) and divide a
# {fsdp: 4, tensor: 2} mesh; a sliding window shorter than the test rows; caps small enough to bite.
_WINDOWED = dict(sliding_window=5)
_GEMMA = dict(_WINDOWED, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh")
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        dict(
            head_dim=10,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": ("MistralConfig", dict(_WINDOWED, head_dim=10)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=10, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "olmo2": ("Olmo2Config", dict(pad_token_id=1, bos_token_id=None, eos_token_id=2)),
    "gemma2": (
        "Gemma2Config",
        dict(_GEMMA, head_dim=10, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            _GEMMA,
            head_dim=10,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}


def make_hf_family(folder: pathlib.Path, model_type: str, seed: int = 0, **overrides):
    """Saves a tiny random float32 model of `model_type` (a key of FAMILY_CONFIGS); returns the torch model.

    Norm weights and biases are moved away from their initial values so a wrong mapping shows.
    """
    import torch
    import transformers

    config_class, family_kwargs = FAMILY_CONFIGS[model_type]
    kwargs = dict(
        vocab_size=98,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,  # large enough that attention is far from uniform and the caps bite
        attn_implementation="eager",
    )
    kwargs.update(family_kwargs, **overrides)
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def assert_params_close(got, expected, rtol: float = 1e-5) -> None:
    """Relative difference of each tensor as a whole (||a - b|| / ||b||).

    Element-wise relative checks are not meaningful after Adam steps: an element whose gradient is
    near zero gets an update of about lr * sign(g), which float32 reduction order can change.
    """
    for name, value in expected.items():
        relative = np.linalg.norm(got[name] - value) / np.linalg.norm(value)
        assert relative <= rtol, (name, relative)


def gradient_recorder():
    """An optax optimizer that leaves parameters alone and keeps the step's gradient, exactly, in its
    state (`state.opt_state["grads"]`): no float32 `end - start` read-off of an update."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        return {"grads": jax.tree.map(jnp.zeros_like, params)}

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), {"grads": grads}

    return optax.GradientTransformation(init, update)
