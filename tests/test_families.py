"""Every supported family against its own transformers implementation (float32, CPU).

For each family a tiny random model is saved with transformers; jsft loads it on one device and on a
{fsdp: 4, tensor: 2} mesh of simulated devices, with layers unrolled and scanned, and must reproduce
transformers' logits on a padded batch and on a packed row, its loss on a masked batch, and export every
weight back bit-identically.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import FAMILY_CONFIGS, make_hf_family
from jax.sharding import PartitionSpec as P

from jsft import hf, loss, models, sharding
from jsft.errors import UnsupportedModelError
from jsft.models.attention import attention_mask
from jsft.models.config import SLIDING_ATTENTION, ModelConfig

ATOL = 1e-4
LOSS_ATOL = 1e-5
# bfloat16 (8-bit mantissa) logits against float32 ones, for these tiny models (|logit| < 5): measured
# maxima are 0.05-0.11 per family, the same as transformers' own bfloat16 against its float32 (0.06-0.11).
BF16_ATOL = 0.15
ROW = 20
PADDED_LENGTHS = (20, 13, 6)  # rows 0-2: one sequence each, right-padded; the window (5) is shorter
PACKED_LENGTHS = (9, 7, 3)  # row 3: three sequences packed, then one padding token
PROMPT = 3  # the loss ignores each padded row's first tokens, as SFT ignores prompts
FSDP4_TENSOR2 = {"data": 1, "fsdp": 4, "tensor": 2}
# name -> (mesh shape or None for one device, scan_layers)
SETTINGS = {
    "one_device": (None, False),
    "one_device_scanned": (None, True),
    "fsdp4_tensor2": (FSDP4_TENSOR2, False),
    "fsdp4_tensor2_scanned": (FSDP4_TENSOR2, True),
}
VOCAB = 98


@dataclasses.dataclass
class Reference:
    """A saved tiny model, one batch of inputs, and what transformers computes on them."""

    folder: str
    input_ids: np.ndarray  # [4, ROW]
    positions: np.ndarray
    segment_ids: np.ndarray
    padded_logits: np.ndarray  # transformers on rows 0-2 with an attention mask
    packed_logits: list[np.ndarray]  # transformers on each packed sequence alone
    loss_mask: np.ndarray  # [3, ROW]
    loss: float  # transformers' mean loss on rows 0-2 with labels -100 outside loss_mask


def _hf_padded(model, sequences: list[np.ndarray], labels_mask: np.ndarray | None = None):
    ids = np.zeros((len(sequences), max(map(len, sequences))), np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    kwargs = {"attention_mask": torch.tensor(mask)}
    if labels_mask is not None:
        kwargs["labels"] = torch.tensor(np.where(labels_mask, ids, -100))
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs)


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def reference(request, tmp_path_factory) -> Reference:
    folder = tmp_path_factory.mktemp(request.param)
    return make_reference(folder, make_hf_family(folder, request.param))


def make_reference(folder, model) -> Reference:
    """The test batch and transformers' outputs on it, for `model` saved in `folder`."""
    rng = np.random.default_rng(0)
    padded = [rng.integers(3, VOCAB, n) for n in PADDED_LENGTHS]
    packed = [rng.integers(3, VOCAB, n) for n in PACKED_LENGTHS]
    input_ids = np.zeros((4, ROW), np.int32)
    positions = np.zeros((4, ROW), np.int32)
    segment_ids = np.zeros((4, ROW), np.int32)
    for row, seq in enumerate(padded):
        input_ids[row, : len(seq)], segment_ids[row, : len(seq)] = seq, 1
        positions[row] = np.arange(ROW)
    start = 0
    for segment, seq in enumerate(packed, start=1):
        end = start + len(seq)
        input_ids[3, start:end], segment_ids[3, start:end] = seq, segment
        positions[3, start:end] = np.arange(len(seq))
        start = end
    loss_mask = (segment_ids[:3] > 0) & (np.arange(ROW) >= PROMPT)
    with_loss = _hf_padded(model, padded, loss_mask)
    return Reference(
        folder=str(folder),
        input_ids=input_ids,
        positions=positions,
        segment_ids=segment_ids,
        padded_logits=with_loss.logits.numpy(),
        packed_logits=[
            logits[: len(seq)]
            for logits, seq in zip(_hf_padded(model, packed).logits.numpy(), packed, strict=True)
        ],
        loss_mask=loss_mask,
        loss=float(with_loss.loss),
    )


_runs: dict[tuple, tuple] = {}


def _jsft(ref: Reference, setting: str, dtype: str = "float32"):
    """(layout, params, logits [4, ROW, vocab]) of jsft on `ref`'s batch, computed once per setting."""
    key = (ref.folder, setting, dtype)
    if key not in _runs:
        shape, scan_layers = SETTINGS[setting]
        mesh = sharding.make_mesh(shape) if shape else sharding.single_device_mesh()
        cfg, _ = models.config_from_folder(ref.folder, dtype, dtype, scan_layers=scan_layers)
        layout = models.Layout(cfg)
        params = models.load_params(ref.folder, layout, mesh)
        forward = jax.jit(lambda p, ids, pos, seg: layout.merge(p)(ids, pos, seg).astype(np.float32))
        logits = np.asarray(forward(params, ref.input_ids, ref.positions, ref.segment_ids))
        _runs[key] = layout, params, logits
    return _runs[key]


def _assert_logits_match(ref: Reference, logits: np.ndarray, atol: float) -> None:
    for row, n in enumerate(PADDED_LENGTHS):  # padding positions are not compared
        np.testing.assert_allclose(logits[row, :n], ref.padded_logits[row, :n], atol=atol, rtol=0)
    start = 0
    for expected in ref.packed_logits:
        np.testing.assert_allclose(logits[3, start : start + len(expected)], expected, atol=atol, rtol=0)
        start += len(expected)


@pytest.mark.parametrize("setting", SETTINGS)
def test_logits_match_transformers(reference, setting):
    _, _, logits = _jsft(reference, setting)
    _assert_logits_match(reference, logits, ATOL)


@pytest.mark.parametrize("setting", SETTINGS)
def test_masked_loss_matches_transformers(reference, setting):
    _, _, logits = _jsft(reference, setting)
    targets, mask = reference.input_ids[:3, 1:], reference.loss_mask[:, 1:]
    total = loss.token_loss_sum(logits[:3, :-1], targets, mask)
    assert abs(float(total) / mask.sum() - reference.loss) <= LOSS_ATOL


@pytest.mark.parametrize("setting", SETTINGS)
def test_export_round_trip_is_bit_identical(reference, setting):
    layout, params, _ = _jsft(reference, setting)
    exported = models.to_hf_tensors(params, layout)
    original = dict(hf.iter_tensors(reference.folder))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name], tensor), name


def test_scanned_layers_are_stacked(reference):
    """Scanned: one parameter per kind of weight, layer axis first, equal to the unrolled layers."""
    _, unrolled, _ = _jsft(reference, "one_device")
    _, stacked, _ = _jsft(reference, "one_device_scanned")
    assert len(stacked) < len(unrolled)
    for name, value in stacked.items():
        if name.startswith("layers."):
            layers = [unrolled[name.replace("layers.", f"layers.{i}.", 1)] for i in range(value.shape[0])]
            np.testing.assert_array_equal(value, np.stack(layers), err_msg=name)
        else:
            np.testing.assert_array_equal(value, unrolled[name], err_msg=name)


@pytest.mark.parametrize("setting", ["fsdp4_tensor2", "fsdp4_tensor2_scanned"])
def test_sharded_load_splits_every_matrix(reference, setting):
    """On the mesh no device holds a whole weight matrix: loading never makes replicated copies."""
    _, params, _ = _jsft(reference, setting)
    layer = "layers." if SETTINGS[setting][1] else "layers.0."
    stacked = (None,) if SETTINGS[setting][1] else ()
    assert params[f"{layer}attn.q_proj"].sharding.spec == P(*stacked, "fsdp", "tensor", None)
    # the MLP's intermediate dimension takes fsdp (sharding.CLAIMS_FIRST), the model dimension nothing
    assert params[f"{layer}mlp.gate_proj"].sharding.spec == P(*stacked, None, ("fsdp", "tensor"))
    assert params[f"{layer}mlp.down_proj"].sharding.spec == P(*stacked, ("fsdp", "tensor"), None)
    for name, array in params.items():
        if name.endswith("_proj") or name in ("embed", "lm_head"):
            assert {s.data.size for s in array.addressable_shards} == {array.size // 8}, name


def test_an_mlp_width_fsdp_does_not_divide_leaves_fsdp_to_the_model_dimension():
    mesh = jax.sharding.AbstractMesh((1, 8, 1, 1, 1), sharding.MESH_AXES)
    assert sharding.logical_to_spec(("embed", "mlp_kernel"), (64, 96), mesh) == P(None, "fsdp")
    assert sharding.logical_to_spec(("embed", "mlp_kernel"), (64, 100), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("mlp_kernel", "embed"), (100, 64), mesh) == P(None, "fsdp")


def test_bfloat16_logits_are_close_to_float32(reference):
    _, _, logits = _jsft(reference, "one_device", "bfloat16")
    _assert_logits_match(reference, logits, BF16_ATOL)


def test_sliding_window_counts_keys_like_transformers():
    """transformers keeps key k for query q when q - k < window: a window of 3 sees the query and 2 before."""
    allowed = np.asarray(attention_mask(np.ones((1, 6), np.int32), sliding_window=3))[0, 0, 0]
    assert allowed[5].tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize(
    "config_class, kwargs",
    [
        ("Gemma2Config", {}),
        ("Gemma3TextConfig", {"sliding_window_pattern": 3}),
        ("Gemma3TextConfig", {}),
        ("Qwen2Config", {"use_sliding_window": True, "max_window_layers": 4}),
        ("MistralConfig", {}),
        ("MistralConfig", {"sliding_window": None}),
    ],
)
def test_layer_types_without_the_field_follow_transformers(config_class, kwargs):
    """Older config.json files have no `layer_types`; jsft derives them as transformers does."""
    config = getattr(transformers, config_class)(num_hidden_layers=7, **kwargs)
    expected = (
        getattr(config, "layer_types", None)
        or [SLIDING_ATTENTION if config.sliding_window else "full_attention"] * 7
    )
    hf_config = config.to_dict()
    hf_config.pop("layer_types", None)
    if "sliding_window_pattern" in kwargs:
        hf_config["sliding_window_pattern"] = kwargs["sliding_window_pattern"]
    cfg = ModelConfig.from_hf(hf_config)
    assert [cfg.is_sliding(i) for i in range(7)] == [t == SLIDING_ATTENTION for t in expected]


def test_gemma3_legacy_rope_fields():
    hf_config = transformers.Gemma3TextConfig().to_dict()
    hf_config.pop("rope_parameters")
    hf_config.update(
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0}
    )
    cfg = ModelConfig.from_hf(hf_config)
    assert (cfg.rope_theta, cfg.local_rope_theta) == (1e6, 1e4)
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 8.0)


def test_unsupported_features_are_clear_errors():
    with pytest.raises(
        UnsupportedModelError, match="unsupported model_type 'gpt2'.*supported: llama, mistral"
    ):
        ModelConfig.from_hf({"model_type": "gpt2"})
    qwen = transformers.Qwen2Config().to_dict()
    qwen["rope_parameters"] = {"rope_type": "mrope", "mrope_section": [1, 1, 2], "rope_theta": 1e6}
    with pytest.raises(
        UnsupportedModelError, match="rope_scaling type 'mrope'.*supported: default, linear, llama3, yarn"
    ):
        ModelConfig.from_hf(qwen)
    with pytest.raises(UnsupportedModelError, match="activation 'relu'"):
        ModelConfig.from_hf(dict(transformers.LlamaConfig().to_dict(), hidden_act="relu"))


@pytest.mark.parametrize("setting", ["fsdp4_tensor2", "fsdp4_tensor2_scanned"])
def test_activation_sharding_keeps_the_logits(reference, setting):
    """Under the mesh context the activations are pinned to their logical axes; the logits stay the same."""
    layout, params, unpinned = _jsft(reference, setting)
    with jax.set_mesh(sharding.make_mesh(FSDP4_TENSOR2)):
        forward = jax.jit(lambda p, ids, pos, seg: layout.merge(p)(ids, pos, seg))
        args = (params, reference.input_ids, reference.positions, reference.segment_ids)
        assert "sharding_constraint" in forward.lower(*args).as_text()
        pinned = np.asarray(forward(*args))
    np.testing.assert_allclose(pinned, unpinned, atol=1e-5, rtol=0)
    _assert_logits_match(reference, pinned, ATOL)
