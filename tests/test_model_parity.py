"""jsft logits and weights against transformers' own PyTorch Llama (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_llama

from jsft import models

ATOL = 1e-4


def _hf_logits(folder, input_ids, attention_mask=None, position_ids=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(input_ids), **kwargs).logits.numpy()


def test_padded_batch_matches_transformers(hf_llama):
    rng = np.random.default_rng(0)
    lengths = [13, 9, 4]
    ids = np.zeros((3, 13), np.int64)
    mask = np.zeros((3, 13), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, 97, n)
        mask[row, :n] = 1
    expected = _hf_logits(hf_llama, ids, attention_mask=mask)
    model = models.load_pretrained(str(hf_llama))
    got = np.asarray(model(ids.astype(np.int32), segment_ids=mask.astype(np.int32)))
    for row, n in enumerate(lengths):  # padding positions are not compared
        np.testing.assert_allclose(got[row, :n], expected[row, :n], atol=ATOL, rtol=0)


def test_packed_row_matches_separate_sequences(hf_llama):
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, 97, 11), rng.integers(1, 97, 7)
    packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    segment_ids = np.array([[1] * 11 + [2] * 7 + [0, 0]], np.int32)
    positions = np.array([list(range(11)) + list(range(7)) + [0, 1]], np.int32)
    model = models.load_pretrained(str(hf_llama))
    got = np.asarray(model(packed, positions=positions, segment_ids=segment_ids))
    np.testing.assert_allclose(got[0, :11], _hf_logits(hf_llama, a[None])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[0, 11:18], _hf_logits(hf_llama, b[None])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True},
        {"attention_bias": True},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ],
    ids=["tied", "bias", "llama3_rope"],
)
def test_variants_match_transformers(tmp_path, overrides):
    folder = make_hf_llama(tmp_path / "m", seed=3, **overrides)
    ids = np.random.default_rng(2).integers(1, 97, (2, 40))
    expected = _hf_logits(folder, ids)
    got = np.asarray(models.load_pretrained(str(folder))(ids.astype(np.int32)))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_export_round_trip_is_bit_identical(hf_llama):
    from jsft import hf

    cfg, hf_config = models.config_from_folder(str(hf_llama))
    layout = models.Layout(cfg)
    mesh = models.sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    exported = models.to_hf_tensors(models.load_params(str(hf_llama), layout, mesh), layout)
    original = dict(hf.iter_tensors(str(hf_llama)))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name], tensor), name


def test_bad_folders_are_clear_errors(tmp_path):
    from jsft import hf
    from jsft.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match="does not exist"):
        models.load_pretrained(str(tmp_path / "nope"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="pickle"):
        hf.safetensors_files(str(tmp_path / "bin"))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        models.ModelConfig.from_hf({"model_type": "gpt2"})
