"""PEFT adapters out and in: what jsft trains, peft loads onto the transformers base with the same logits
(and so does the merged export), for Llama and Qwen2 (biases, tied embeddings); `lora.init_from`
continues from an adapter peft wrote, with peft's logits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_family

from jsft import export, models, sharding
from jsft.config import default_config
from jsft.errors import JsftError
from jsft.trainer import Trainer

peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 19]], np.int32)
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _trainer(folder, scan_layers=True, total_steps=10, **lora):
    cfg = default_config()
    cfg.optim.lr, cfg.optim.warmup_ratio = 3e-2, 0.0
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    for key, value in lora.items():
        cfg.lora[key] = value
    model_cfg, _ = models.config_from_folder(str(folder), scan_layers=scan_layers)
    trainer = Trainer(cfg, models.Layout(model_cfg), sharding.single_device_mesh(), total_steps=total_steps)
    return trainer, trainer.load_state(str(folder))


def _batch(vocab, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (4, 24)).astype(np.int32)
    return {
        "input_ids": ids,
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(24, dtype=np.int32), ids.shape).copy(),
    }


def _logits(trainer, state) -> np.ndarray:
    layout = trainer.layout
    return np.asarray(jax.jit(lambda p: layout.merge(p)(IDS))({**state.base, **state.params}))


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize(
    "model_type, options",
    [
        ("llama", dict(also_train="embed,.*norm.*", dropout=0.1)),
        ("qwen2", dict(use_rslora=True, targets="q_proj,v_proj,o_proj,down_proj", scan_layers=False)),
    ],
)
def test_adapter_and_merged_export_reproduce_jsft_logits(tmp_path, model_type, options):
    folder = tmp_path / "base"
    make_hf_family(folder, model_type)
    scan_layers = options.pop("scan_layers", True)
    trainer, state = _trainer(folder, scan_layers, **options)
    for i in range(3):
        state, _ = trainer.train_step(state, trainer.device_batch(_batch(trainer.layout.cfg.vocab_size, i)))
    ours = _logits(trainer, state)
    layout, trained = trainer.layout, jax.device_get(state.params)

    export.write_adapter(str(tmp_path / "adapter"), trained, layout, str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] == options.get("use_rslora", False)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    base_logits = _torch_logits(base)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    np.testing.assert_allclose(ours, _torch_logits(adapted), atol=1e-4, rtol=0)
    assert np.abs(ours - base_logits).max() > 1e-2

    plain = models.Layout(layout.cfg)
    merged = layout.lora.merge(models.load_params(str(folder), plain, sharding.single_device_mesh()), trained)
    files = {"config.json": (folder / "config.json").read_bytes()}
    export.write_folder(str(tmp_path / "merged"), models.to_hf_tensors(merged, plain), files, "", "float32")
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    )
    np.testing.assert_allclose(ours, _torch_logits(merged_model), atol=1e-4, rtol=0)


def _peft_adapter(folder, out, **config):
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, **config)  # random A and B: not the base
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    model.save_pretrained(out)
    return _torch_logits(model)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_init_from_a_peft_adapter_gives_peft_logits(tmp_path, scan_layers):
    folder = tmp_path / "base"
    make_hf_family(folder, "llama")
    expected = _peft_adapter(folder, tmp_path / "adapter", target_modules=ALL.split(","), use_rslora=True)
    trainer, state = _trainer(folder, scan_layers, init_from=str(tmp_path / "adapter"), use_rslora=True)
    np.testing.assert_allclose(_logits(trainer, state), expected, atol=1e-4, rtol=0)
    state, metrics = trainer.train_step(state, trainer.device_batch(_batch(98, 0)))  # and trains on
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_init_from_a_regex_adapter_and_refusals(tmp_path):
    folder = tmp_path / "base"
    make_hf_family(folder, "mistral")
    expected = _peft_adapter(folder, tmp_path / "adapter", target_modules=r".*\.(q|v)_proj")
    trainer, state = _trainer(folder, init_from=str(tmp_path / "adapter"), target_regex=r".*(q|v)_proj")
    np.testing.assert_allclose(_logits(trainer, state), expected, atol=1e-4, rtol=0)
    with pytest.raises(JsftError, match=r"lora.rank=4 \(run has 8\)"):
        _trainer(folder, init_from=str(tmp_path / "adapter"), target_regex=r".*(q|v)_proj", rank=8)
    with pytest.raises(JsftError, match="lora.targets"):
        _trainer(folder, init_from=str(tmp_path / "adapter"))
    with pytest.raises(JsftError, match="no PEFT adapter folder"):
        _trainer(folder, init_from=str(tmp_path))
