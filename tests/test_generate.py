"""Generation: greedy tokens equal transformers' generate for every family (with and without the KV
cache, on a sharded mesh); padding side, stop tokens, streaming; the sampling distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import FAMILY_CONFIGS, make_hf_family

from jsft import generate, models, sharding
from jsft.errors import JsftError

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 11, 8, 3)  # 4 rows: split over fsdp=4 of the 8 devices


def sharded_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENGTHS]  # no pad/bos/eos ids


def hf_greedy(model, prompts: list[list[int]], pad_id: int) -> np.ndarray:
    """transformers' greedy generate on left-padded float32 prompts: the new tokens [batch, <= 32]."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return out[:, width:].numpy()


def load(folder, mesh, scan_layers=True):
    cfg, hf_config = models.config_from_folder(str(folder), scan_layers=scan_layers)
    layout = models.Layout(cfg)
    return layout, models.load_params(str(folder), layout, mesh), hf_config


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_greedy_equals_transformers_generate(model_type, tmp_path):
    torch_model = make_hf_family(tmp_path, model_type)
    mesh = sharded_mesh()
    layout, params, hf_config = load(tmp_path, mesh)
    prompts = prompts_for(hf_config["vocab_size"])
    pad_id, eos_id = hf_config["pad_token_id"], hf_config["eos_token_id"]
    expected = hf_greedy(torch_model, prompts, pad_id)
    generator = generate.Generator(layout, mesh)
    for use_cache in (True, False):
        sampling = generate.Sampling(NEW_TOKENS, stop_ids=(eos_id,), pad_id=pad_id, use_cache=use_cache)
        ids, mask = generate.pad_prompts(prompts)
        got = generator.generate_padded(params, ids, mask, sampling)
        np.testing.assert_array_equal(got[:, : expected.shape[1]], expected, err_msg=f"use_cache={use_cache}")
        assert (got[:, expected.shape[1] :] == pad_id).all()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen_llama")
    make_hf_family(folder, "llama")
    mesh = sharded_mesh()
    layout, params, hf_config = load(folder, mesh)
    return generate.Generator(layout, mesh), params, prompts_for(hf_config["vocab_size"], seed=1)


def test_right_padding_stop_tokens_and_streaming(llama):
    generator, params, prompts = llama
    greedy = generate.Sampling(12)
    left = generator.generate(params, prompts, greedy).tokens
    ids, mask = generate.pad_prompts(prompts, side="right")
    right = generator.generate_padded(params, ids, mask, greedy)
    np.testing.assert_array_equal(right, np.asarray(left))
    assert all(len(row) == 12 for row in left)

    stop = left[0][4]  # row 0 stops at its 5th token (the token's first occurrence there)
    first = left[0].index(stop)
    stopped = generator.generate(params, prompts, generate.Sampling(12, stop_ids=(stop,)))
    assert stopped.tokens[0] == left[0][: first + 1] and stopped.stopped[0]
    for row, full in zip(stopped.tokens, left, strict=True):
        assert row == (full[: full.index(stop) + 1] if stop in full else full)

    assert list(generator.stream(params, prompts[1], greedy)) == left[1]
    assert (
        list(generator.stream(params, prompts[0], generate.Sampling(12, stop_ids=(stop,))))
        == stopped.tokens[0]
    )


def test_unrolled_layers_decode_like_scanned(llama, tmp_path):
    generator, params, prompts = llama
    make_hf_family(tmp_path, "llama")
    layout, unrolled_params, _ = load(tmp_path, generator.mesh, scan_layers=False)
    unrolled = generate.Generator(layout, generator.mesh)
    sampling = generate.Sampling(8)
    assert unrolled.generate(unrolled_params, prompts, sampling) == generator.generate(
        params, prompts, sampling
    )


def test_sampling_follows_tempered_nucleus_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    keys = jax.random.split(jax.random.key(0), 20000)

    def frequencies(sampling):
        draws = jax.vmap(lambda k: generate.pick(logits, k, sampling))(keys)[:, 0]
        return np.bincount(np.asarray(draws), minlength=4) / len(keys)

    plain = frequencies(generate.Sampling(temperature=1.0))
    np.testing.assert_allclose(plain, [0.5, 0.25, 0.15, 0.1], atol=0.015)
    hot = frequencies(generate.Sampling(temperature=2.0))
    tempered = np.sqrt([0.5, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(hot, tempered / tempered.sum(), atol=0.015)
    # top_p=0.7: 0.5 + 0.25 reach it, so the nucleus is the first two tokens, renormalised
    nucleus = frequencies(generate.Sampling(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(nucleus, [2 / 3, 1 / 3, 0, 0], atol=0.015)
    assert nucleus[2:].sum() == 0
    assert int(generate.pick(logits, keys[0], generate.Sampling(temperature=1.0, top_p=1e-6))[0]) == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: generate.Sampling(0), "max_new_tokens must be at least 1"),
        (lambda: generate.Sampling(temperature=-1.0), "temperature must be >= 0"),
        (lambda: generate.Sampling(top_p=0.0), "top_p must be in (0, 1]"),
        (lambda: generate.pad_prompts([[1, 2], []]), "every prompt needs at least one token"),
    ],
)
def test_bad_settings_are_one_line_errors(make, message):
    with pytest.raises(JsftError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        make()
