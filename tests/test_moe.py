"""Mixture-of-experts families (Qwen3-MoE, Mixtral, OLMoE) against their transformers implementations.

Tiny random float32 models (2 layers, 4-8 experts, top-2) saved by transformers; jsft loads them through
its normal path and must reproduce the logits on padded and packed rows, the router's load-balancing loss,
and an export that transformers loads with the same logits. Reuses test_families' batch and runs.
"""

from __future__ import annotations

import copy
import math
import pathlib
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_params_close, gradient_recorder, small_model_config
from test_families import (
    ATOL,
    FSDP4_TENSOR2,
    PACKED_LENGTHS,
    PADDED_LENGTHS,
    _assert_logits_match,
    _hf_padded,
    _jsft,
    make_reference,
)
from test_generate import prompts_for
from transformers.models.switch_transformers import modeling_switch_transformers as switch_transformers

from jsft import export, flops, generate, hf, models, sharding, step
from jsft.config import default_config
from jsft.errors import ConfigError, UnsupportedModelError
from jsft.lora.params import init_factors
from jsft.lora.spec import LoraSpec
from jsft.models.config import ModelConfig
from jsft.models.shapes import KNOWN_CONFIGS
from jsft.trainer import Trainer

AUX_ATOL = 1e-5
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MOE_CONFIGS: dict[str, tuple[str, dict]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(head_dim=10, num_experts=8, moe_intermediate_size=24, norm_topk_prob=True),
    ),
    "mixtral": ("MixtralConfig", dict(head_dim=10, num_local_experts=4, sliding_window=5)),
    "olmoe": (
        "OlmoeConfig",
        dict(num_experts=8, intermediate_size=24, pad_token_id=1, bos_token_id=None, eos_token_id=2),
    ),
}
SETTINGS = ("one_device", "one_device_scanned", "fsdp4_tensor2_scanned")


def make_hf_moe(folder, model_type: str, seed: int = 0):
    """Saves a tiny random model of `model_type` (a key of MOE_CONFIGS); returns the torch model.
    Norms and routers are moved off their initial values, so a wrong mapping or routing shows."""
    config_class, family_kwargs = MOE_CONFIGS[model_type]
    kwargs = dict(
        vocab_size=98,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        router_aux_loss_coef=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,
    )
    kwargs.update(family_kwargs)
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "gate.weight" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def moe(request, tmp_path_factory):
    """(test_families.Reference, torch model) of one family."""
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_moe(folder, request.param)
    return make_reference(folder, model), model


@pytest.mark.parametrize("setting", SETTINGS)
def test_logits_match_transformers(moe, setting):
    ref, _ = moe
    _, _, logits = _jsft(ref, setting)
    _assert_logits_match(ref, logits, ATOL)


def test_logits_traced_under_the_mesh_match_transformers(moe):
    """Under the mesh each device routes its own rows (`MoE`'s shard_map), experts' width over tensor."""
    ref, _ = moe
    layout, params, _ = _jsft(ref, "fsdp4_tensor2_scanned")
    with jax.set_mesh(sharding.make_mesh(FSDP4_TENSOR2)):
        forward = jax.jit(lambda p, ids, pos, seg: layout.merge(p)(ids, pos, seg))
        args = (params, ref.input_ids, ref.positions, ref.segment_ids)
        assert "sdy.manual_computation" in forward.lower(*args).as_text()  # the shard_map
        logits = np.asarray(forward(*args))
    _assert_logits_match(ref, logits, ATOL)


def test_weights_load_stacked_and_export_bit_identically(moe):
    ref, _ = moe
    layout, params, _ = _jsft(ref, "one_device_scanned")
    cfg = layout.cfg
    assert params["layers.mlp.gate_proj"].shape == (2, cfg.experts.count, 48, cfg.experts.intermediate_size)
    exported = models.to_hf_tensors(params, layout)
    original = dict(hf.iter_tensors(ref.folder))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert np.array_equal(exported[name], tensor), name


def _forward(layout: models.Layout, params: models.Params, ref) -> np.ndarray:
    """jsft's logits on the test batch."""
    forward = jax.jit(lambda p, ids, pos, seg: layout.merge(p)(ids, pos, seg))
    return np.asarray(forward(params, ref.input_ids, ref.positions, ref.segment_ids))


def _sequences(ref) -> list[np.ndarray]:
    """The batch's padded and packed sequences, each alone."""
    padded = [ref.input_ids[row, :n] for row, n in enumerate(PADDED_LENGTHS)]
    starts = np.cumsum((0, *PACKED_LENGTHS))
    return padded + [ref.input_ids[3, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_aux_loss_matches_transformers(moe):
    """transformers' load-balancing loss over the real tokens (its attention mask) of the six sequences;
    jsft's over the same tokens, three of them packed in one row."""
    ref, model = moe
    layout, params, _ = _jsft(ref, "one_device")
    aux = jax.jit(lambda p, ids, pos, seg: layout.merge(p).hidden_states(ids, pos, seg, router=True)[1].aux)(
        params, ref.input_ids, ref.positions, ref.segment_ids
    )
    model.config.output_router_logits = True
    expected = float(_hf_padded(model, _sequences(ref)).aux_loss)
    model.config.output_router_logits = False
    assert expected > 1.0  # experts x (share x probability) summed: 1 when perfectly balanced
    assert abs(float(aux) - expected) <= AUX_ATOL, (float(aux), expected)


def test_exported_folder_loads_in_transformers_with_jsft_logits(moe, tmp_path):
    """Changed weights (stacked over layers and experts) written by jsft, read by transformers."""
    ref, _ = moe
    layout, params, _ = _jsft(ref, "one_device_scanned")
    rng = np.random.default_rng(1)
    changed = {
        name: value + 0.05 * rng.standard_normal(value.shape, np.float32) for name, value in params.items()
    }
    logits = np.asarray(_forward(layout, changed, ref)[:3])
    files = {"config.json": pathlib.Path(ref.folder, "config.json").read_bytes()}
    out = export.write_folder(
        str(tmp_path / "export"), models.to_hf_tensors(changed, layout), files, "# card\n", "float32"
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    expected = _hf_padded(reloaded, _sequences(ref)[:3]).logits.numpy()
    for row, n in enumerate(PADDED_LENGTHS):
        np.testing.assert_allclose(logits[row, :n], expected[row, :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("moe", ["olmoe"], indirect=True)
def test_lora_adapts_attention_of_an_moe_model(moe, tmp_path):
    """LoRA factors on the attention projections give the logits of their merged kernels, and PEFT
    loads them as an adapter of the transformers model with the same logits; targeting the experts is a
    one-line error."""
    ref, _ = moe
    cfg, _ = models.config_from_folder(ref.folder)
    mesh = sharding.single_device_mesh()
    spec = LoraSpec(rank=4, alpha=8.0, targets=ATTENTION)
    layout = models.Layout(cfg, lora=spec)
    base = models.load_params(ref.folder, layout, mesh)
    factors = init_factors(layout, 0, mesh)
    assert {name.split(".")[-2] for name in factors} == set(ATTENTION)
    factors = {n: v + 0.1 if n.endswith("lora_b") else v for n, v in factors.items()}
    adapted = _forward(layout, {**base, **factors}, ref)
    merged = _forward(models.Layout(cfg), spec.merge(base, factors), ref)
    np.testing.assert_allclose(adapted, merged, atol=1e-5, rtol=0)
    peft = pytest.importorskip("peft")
    export.write_adapter(str(tmp_path / "adapter"), jax.device_get(factors), layout, ref.folder)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(ref.folder, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter")
    expected = _hf_padded(peft_model.eval(), _sequences(ref)[:3]).logits.numpy()
    for row, n in enumerate(PADDED_LENGTHS):
        np.testing.assert_allclose(adapted[row, :n], expected[row, :n], atol=ATOL, rtol=0)
    with pytest.raises(UnsupportedModelError, match="lora.targets names gate_proj, up_proj, down_proj"):
        models.Layout(cfg, lora=LoraSpec(rank=4, alpha=8.0))


@pytest.mark.parametrize(
    "config_class, change, key",
    [
        ("Qwen3MoeConfig", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        ("Qwen3MoeConfig", {"mlp_only_layers": [0]}, "mlp_only_layers=[0]"),
        ("MixtralConfig", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
        ("OlmoeConfig", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        ("MixtralConfig", {"num_local_experts": None}, "lacks num_experts"),
    ],
)
def test_unsupported_moe_layouts_are_one_line_errors(config_class, change, key):
    hf_config = {**getattr(transformers, config_class)().to_dict(), **change}
    with pytest.raises(UnsupportedModelError, match=f"^[^\n]*{re.escape(key)}[^\n]*$"):
        ModelConfig.from_hf(hf_config)


def test_norm_topk_prob_as_each_family_reads_it():
    """Mixtral renormalises always; Qwen3-MoE and OLMoE as config.json says."""
    read = {
        name: ModelConfig.from_hf(getattr(transformers, name)(norm_topk_prob=False).to_dict()).experts
        for name in ("Qwen3MoeConfig", "MixtralConfig", "OlmoeConfig")
    }
    assert [e.norm_topk_prob for e in read.values()] == [False, True, False]
    assert read["Qwen3MoeConfig"].count == 128 and read["Qwen3MoeConfig"].intermediate_size == 768
    assert read["MixtralConfig"].count == 8 and read["MixtralConfig"].intermediate_size == 14336


def _assert_gradients_close(got: dict, expected: dict, rtol: float) -> None:
    """Each tensor within `rtol` of its norm; one of an expert no token chose is zero in both."""
    assert sorted(got) == sorted(expected)
    unused = {n for n, g in expected.items() if not np.any(g)}
    assert all(not np.any(got[n]) for n in unused), unused
    assert_params_close(
        {n: got[n] for n in got if n not in unused}, {n: expected[n] for n in got if n not in unused}, rtol
    )


def _padded_batch(ref) -> dict[str, np.ndarray]:
    """Rows 0-2 of the test batch as a training batch: next-token targets, the loss on positions past
    the prompt (`ref.loss_mask`, shifted onto the position that predicts them)."""
    ids = ref.input_ids[:3]
    shift = np.zeros_like(ref.loss_mask)
    shift[:, :-1] = ref.loss_mask[:, 1:]
    return {
        "input_ids": ids,
        "positions": ref.positions[:3],
        "segment_ids": ref.segment_ids[:3],
        "target_ids": np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1),
        "loss_mask": shift.astype(np.int32),
    }


def _router_reference(out, mask: np.ndarray, per_token: int) -> dict[str, float]:
    """The router z-loss (transformers' Switch Transformers `router_z_loss_func`) and the experts' loads
    (each expert's share of a layer's top-k assignments x experts, largest and smallest over layers) from
    transformers' router logits, over the real tokens (`mask`) only."""
    real = torch.tensor(mask.reshape(-1).astype(bool))
    layers = torch.stack([logits[real] for logits in out.router_logits])  # [layers, real tokens, experts]
    chosen = torch.topk(layers, per_token, dim=-1).indices
    counts = torch.nn.functional.one_hot(chosen, layers.shape[-1]).sum(dim=(1, 2)).double()
    load = layers.shape[-1] * counts / counts.sum(dim=-1, keepdim=True)
    z_loss = switch_transformers.router_z_loss_func(layers)
    return {
        "router_z_loss": z_loss,
        "expert_load_max": load.max().item(),
        "expert_load_min": load.min().item(),
    }


def _torch_gradient(
    model, ref, folder, aux_coef: float | None = None, z_weight: float = 0.0
) -> tuple[object, dict[str, float], dict[str, np.ndarray]]:
    """(transformers' loss output with the aux loss, the total loss backpropagated and the router
    figures (`_router_reference`), its gradient under the Hub's tensor names). The total is transformers'
    loss with `aux_coef` in place of config.json's coefficient (None: that one) plus `z_weight` x the
    router z-loss. The gradient is written by `save_pretrained` in place of the weights, so fused experts
    come out per expert."""
    model.config.output_router_logits = True
    model.zero_grad()
    ids, mask = (
        np.zeros((3, ref.input_ids.shape[1]), np.int64),
        np.zeros((3, ref.input_ids.shape[1]), np.int64),
    )
    for row, n in enumerate(PADDED_LENGTHS):
        ids[row, :n], mask[row, :n] = ref.input_ids[row, :n], 1
    labels = np.where(ref.loss_mask, ids, -100)
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    model.config.output_router_logits = False
    figures = _router_reference(out, mask, model.config.num_experts_per_tok)
    total = out.loss + z_weight * figures["router_z_loss"]
    if aux_coef is not None:
        total = total + (aux_coef - model.router_aux_loss_coef) * out.aux_loss
    total.backward()
    figures = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in figures.items()} | {
        "loss": total.item(),
        "aux_loss": out.aux_loss.item(),
    }
    saved = copy.deepcopy(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in saved.named_parameters():
            p.copy_(torch.zeros_like(p) if grads[name] is None else grads[name])  # None: expert unused
    saved.save_pretrained(folder, safe_serialization=True)
    return out, figures, dict(hf.iter_tensors(str(folder)))


# OLMoE: top-k weights as the softmax gives them; the trajectory test runs Qwen3-MoE, renormalised
@pytest.mark.parametrize("moe", ["olmoe"], indirect=True)
@pytest.mark.parametrize(
    "aux_coef, z_weight", [(-1.0, 0.0), (0.3, 0.05)], ids=["config_json", "overridden_z"]
)
def test_train_step_loss_and_gradient_are_transformers_with_the_router_losses(
    moe, tmp_path, aux_coef, z_weight
):
    """`loss_reduction=mean`: jsft's step loss is transformers' (mean token loss + router_aux_loss_coef x
    aux loss; `train.router_aux_loss_coef` replacing config.json's 0.02, and `train.router_z_loss` x
    the router z-loss of the real tokens) on the same batch, the router losses and expert loads are
    logged apart, and its gradient is torch's."""
    ref, model = moe
    cfg, _ = models.config_from_folder(ref.folder)
    mesh = sharding.single_device_mesh()
    config = default_config()
    config.train.router_aux_loss_coef, config.train.router_z_loss = aux_coef, z_weight
    trainer = Trainer(config, models.Layout(cfg), mesh, total_steps=1, optimizer=gradient_recorder())
    state = trainer.fresh_state(models.load_params(ref.folder, trainer.layout, mesh))
    state, metrics = trainer.train_step(state, _padded_batch(ref))
    out, figures, expected = _torch_gradient(
        model, ref, tmp_path, aux_coef if aux_coef >= 0 else None, z_weight
    )
    assert out.aux_loss.item() > 1.0
    assert figures["router_z_loss"] > 0.1 and figures["expert_load_max"] > 1.2
    for key in ("loss", "aux_loss", "router_z_loss", "expert_load_max", "expert_load_min"):
        assert abs(float(metrics[key]) - figures[key]) <= AUX_ATOL, (key, float(metrics[key]), figures[key])
    grads = models.to_hf_tensors(jax.device_get(state.opt_state["grads"]), trainer.layout)
    _assert_gradients_close(grads, expected, rtol=1e-4)


@pytest.mark.parametrize(
    "hub_id, total, active",
    [
        ("Qwen/Qwen3-30B-A3B", 30_532_122_624, 3_353_032_704),  # model card: 30.5B, 3.3B activated
        ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704, 12_879_925_248),  # 46.7B, 12.9B active
    ],
)
def test_shape_table_gives_the_published_parameter_counts(hub_id, total, active):
    cfg = ModelConfig.from_hf(KNOWN_CONFIGS[hub_id], scan_layers=True)
    layout = models.Layout(cfg)  # abstract: no weights
    assert cfg.num_params() == sum(math.prod(s.shape) for s in layout.shapes.values()) == total
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size + (cfg.qk_norm == "head") * cfg.num_layers * 2 * 128
    # FLOPs count the matmul weights a token meets: the active parameters but embeddings and norms
    matmuls = flops.flops_per_token(cfg, seq_len=0) / 6
    assert matmuls + cfg.vocab_size * cfg.hidden_size + norms == active


TRAJECTORY_STEPS = 12


def _torch_trajectory(folder: str, ref, lr: float) -> tuple[list[tuple[float, float]], dict[str, np.ndarray]]:
    """transformers + torch AdamW on the padded rows, the aux loss on: each step's (loss, aux loss), and
    the weights after the last step under the Hub's names (`save_pretrained` unfuses the experts)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model.config.output_router_logits = True
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids, mask = (
        np.zeros((3, ref.input_ids.shape[1]), np.int64),
        np.zeros((3, ref.input_ids.shape[1]), np.int64),
    )
    for row, n in enumerate(PADDED_LENGTHS):
        ids[row, :n], mask[row, :n] = ref.input_ids[row, :n], 1
    inputs = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        labels=torch.tensor(np.where(ref.loss_mask, ids, -100)),
    )
    losses = []
    for _ in range(TRAJECTORY_STEPS):
        optimizer.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        optimizer.step()
        losses.append((out.loss.item(), out.aux_loss.item()))
    model.save_pretrained(f"{folder}/trained", safe_serialization=True)
    return losses, dict(hf.iter_tensors(f"{folder}/trained"))


@pytest.mark.parametrize("moe", ["qwen3_moe"], indirect=True)
def test_trajectory_equals_transformers_and_torch_adamw(moe):
    """12 AdamW steps (constant lr, no clipping, no decay) with the aux loss on: the same loss and aux
    loss at every step and the same weights at the end, within 1e-3."""
    ref, _ = moe
    lr = 1e-3
    cfg, _ = models.config_from_folder(ref.folder)
    train_cfg = default_config()
    train_cfg.optim.update(lr=lr, schedule="constant", warmup_ratio=0.0, clip_grad_norm=0.0)
    mesh = sharding.single_device_mesh()
    trainer = Trainer(train_cfg, models.Layout(cfg), mesh, total_steps=TRAJECTORY_STEPS)
    state = trainer.fresh_state(models.load_params(ref.folder, trainer.layout, mesh))
    losses = []
    for _ in range(TRAJECTORY_STEPS):
        state, metrics = trainer.train_step(state, _padded_batch(ref))
        losses.append((float(metrics["loss"]), float(metrics["aux_loss"])))
    expected_losses, expected = _torch_trajectory(ref.folder, ref, lr)
    np.testing.assert_allclose(losses, expected_losses, atol=1e-3, rtol=0)
    assert losses[-1][0] < losses[0][0] - 0.1  # it learns
    trained = models.to_hf_tensors(jax.device_get(state.params), trainer.layout)
    assert_params_close(trained, expected, rtol=1e-3)


@pytest.mark.parametrize("moe", ["mixtral"], indirect=True)  # its sliding window meets the KV cache
def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(moe):
    ref, model = moe
    prompts = prompts_for(98)
    ids, mask = generate.pad_prompts(prompts)  # left-padded with 0, transformers' pad_token_id
    with torch.no_grad():
        expected = model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False
        )[:, ids.shape[1] :].numpy()
    layout, params, _ = _jsft(ref, "one_device_scanned")
    sampling = generate.Sampling(8, stop_ids=(2,), pad_id=0)
    got = generate.Generator(layout, sharding.single_device_mesh()).generate_padded(
        params, ids, mask, sampling
    )
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)


def _whole_batch(ref) -> dict[str, np.ndarray]:
    """The whole test batch (padded and packed rows) as a training batch, every next token trained."""
    ids, seg = ref.input_ids, ref.segment_ids
    same_segment = np.zeros_like(seg)
    same_segment[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return {
        "input_ids": ids,
        "positions": ref.positions,
        "segment_ids": seg,
        "target_ids": np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1),
        "loss_mask": same_segment.astype(np.int32),
    }


def _gradient_step(ref, mesh_shape: dict | None, scan_layers: bool, grad_accum_steps: int = 1):
    """(step metrics, gradient) of one training step on `_whole_batch`."""
    cfg, _ = models.config_from_folder(ref.folder, scan_layers=scan_layers)
    mesh = sharding.make_mesh(mesh_shape) if mesh_shape else sharding.single_device_mesh()
    train_cfg = default_config()
    train_cfg.train.grad_accum_steps = grad_accum_steps
    trainer = Trainer(train_cfg, models.Layout(cfg), mesh, total_steps=1, optimizer=gradient_recorder())
    state = trainer.fresh_state(models.load_params(ref.folder, trainer.layout, mesh))
    state, metrics = trainer.train_step(state, trainer.device_batch(_whole_batch(ref)))
    grads = jax.device_get(state.opt_state["grads"])
    if scan_layers:  # unstacked, to compare with the unrolled layers
        grads = {n: v for n, v in grads.items() if not n.startswith("layers.")} | {
            n.replace("layers.", f"layers.{i}.", 1): v[i]
            for n, v in grads.items()
            if n.startswith("layers.")
            for i in range(cfg.num_layers)
        }
    return jax.device_get(metrics), grads


@pytest.mark.parametrize("moe", ["qwen3_moe"], indirect=True)
def test_accumulated_step_on_a_mesh_equals_one_device_and_weighs_each_aux_loss_by_its_tokens(moe):
    """Two micro-batches (rows r % 2). On {fsdp 2, context 2, tensor 2} of the 8 simulated devices
    (scanned layers, each device routing its own tokens) loss, aux loss and the whole gradient tree equal
    one device's unrolled step. `mean` is (token losses + coef x aux_m x tokens_m, summed over the
    micro-batches) / all trained tokens, and the logged aux loss the micro-batches' mean."""
    ref, _ = moe
    one, one_grads = _gradient_step(ref, None, scan_layers=False, grad_accum_steps=2)
    mesh_shape = {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
    mesh, mesh_grads = _gradient_step(ref, mesh_shape, scan_layers=True, grad_accum_steps=2)
    for key in ("loss", "aux_loss"):
        assert abs(float(mesh[key]) - float(one[key])) <= 1e-6, key
    _assert_gradients_close(mesh_grads, one_grads, rtol=1e-5)

    cfg, _ = models.config_from_folder(ref.folder)
    layout = models.Layout(cfg)
    params = models.load_params(ref.folder, layout, sharding.single_device_mesh())
    terms = jax.jit(lambda p, b: step._loss_terms(layout, p, b))
    batch, total, auxes = _whole_batch(ref), 0.0, []
    for rows in ([0, 2], [1, 3]):
        token_sum, router = terms(params, {k: v[rows] for k, v in batch.items()})
        aux = router.aux
        tokens = batch["loss_mask"][rows].sum()
        total += float(token_sum) + cfg.experts.router_aux_loss_coef * float(aux) * tokens
        auxes.append(float(aux))
    assert abs(auxes[0] - auxes[1]) > 1e-3  # the micro-batches route differently
    assert float(one["aux_loss"]) == pytest.approx(np.mean(auxes), abs=1e-6)
    assert float(one["loss"]) == pytest.approx(total / batch["loss_mask"].sum(), abs=1e-6)


def test_router_weights_resolve_from_config_json_and_are_refused_for_a_dense_model(moe):
    ref, _ = moe
    cfg, _ = models.config_from_folder(ref.folder)
    layout = models.Layout(cfg)
    assert step.RouterWeights.of(layout) == (0.02, 0.0)  # config.json's coefficient, no z-loss
    assert step.RouterWeights.of(layout, 0.0, 1e-3) == (0.0, 1e-3)
    dense = models.Layout(small_model_config())
    assert step.RouterWeights.of(dense) == (0.0, 0.0)
    with pytest.raises(
        ConfigError, match="train.router_aux_loss_coef=-1 / train.router_z_loss=0.001.*no experts"
    ):
        step.RouterWeights.of(dense, -1.0, 1e-3)
