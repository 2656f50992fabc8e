"""PEFT adapters in and out: jsft's factors (and `lora.also_train` parameters) under PEFT's key names and
layouts for every family, its adapter_config.json, and the way back for `lora.init_from`."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from jax.sharding import Mesh

from jsft import hf
from jsft.errors import JsftError, one_line
from jsft.lora.spec import LoraSpec
from jsft.models import Layout, Params

PEFT_PREFIX = "base_model.model."


def _layers(layout: Layout, name: str):
    """(layer index or None, slicer) for each layer a (possibly stacked) parameter covers."""
    if layout.names.is_stacked(name):
        return [(i, functools.partial(lambda x, i: x[i], i=i)) for i in range(layout.cfg.num_layers)]
    return [(None, lambda x: x)]


def peft_tensors(trained: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The trained parameters under PEFT's names and layouts: lora_A [r, in], lora_B [out, r] per HF
    module, and the full tensors of also-trained parameters (PEFT's `modules_to_save`)."""
    out = {}
    for name, value in trained.items():
        value = np.asarray(value)
        kernel, _, factor = name.rpartition(".")
        for layer, take in _layers(layout, name):
            tensor = take(value)
            if factor in ("lora_a", "lora_b"):
                hf_name, _ = layout.names.to_hf(kernel, layer)
                module = PEFT_PREFIX + hf_name.removesuffix(".weight")
                rank = layout.lora.rank
                if factor == "lora_a":
                    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(tensor.reshape(-1, rank).T)
                else:
                    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(tensor.reshape(rank, -1).T)
            else:
                hf_name, transform = layout.names.to_hf(name, layer)
                out[PEFT_PREFIX + hf_name] = np.ascontiguousarray(transform.to_hf(tensor))
    return out


def modules_to_save(layout: Layout) -> list[str]:
    """PEFT's `modules_to_save` for the also-trained parameters: their HF modules' full names (PEFT
    matches name endings, so "model.norm" never catches a layer's norms)."""
    names = set()
    for name in sorted(layout.trainable - layout.adapters):
        for layer, _ in _layers(layout, name):
            hf_name, _ = layout.names.to_hf(name, layer)
            module = hf_name.rsplit(".", 1)[0]
            if module.rsplit(".", 1)[-1] in layout.lora.targets:
                raise JsftError(
                    f"lora.also_train: {name} belongs to an adapted projection; PEFT cannot save it"
                )
            names.add(module)
    return sorted(names)


def peft_config(layout: Layout, base_model: str, revision: str = "") -> dict:
    """adapter_config.json for PEFT's LoraConfig; `revision` is the base model's commit it was trained on."""
    spec = layout.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "modules_to_save": modules_to_save(layout) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def read_peft_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, tensors of adapter_model.safetensors) of a PEFT adapter folder."""
    from safetensors.numpy import load_file

    return read_peft_config(folder), load_file(os.path.join(folder, "adapter_model.safetensors"))


def read_peft_config(folder: str) -> dict:
    """adapter_config.json of a PEFT adapter folder whose weight file is whole (else one line naming it)."""
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise JsftError(
                f"lora.init_from: {folder} is no PEFT adapter folder ({os.path.basename(path)} missing)"
            )
    hf.check_safetensors(weights_path)
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise JsftError(f"lora.init_from: {config_path} is not valid JSON ({one_line(e)})") from None


def check_peft_folder(folder: str, spec: LoraSpec, num_layers: int, model_path: str, any_base: bool) -> None:
    """Everything about `lora.init_from` that can be known before any data is encoded: the folder is a
    whole PEFT LoRA adapter the run's settings continue exactly, trained on the run's base model (unless
    `lora.init_from_any_base`: an adapter on another base trains on, but means something else)."""
    config = read_peft_config(folder)
    check_peft_config(config, spec, folder, num_layers)
    base = config.get("base_model_name_or_path") or ""
    same = base == model_path or (
        os.path.isdir(base) and os.path.isdir(model_path) and os.path.samefile(base, model_path)
    )
    if base and not same and not any_base:
        raise JsftError(
            f"lora.init_from: {folder} was trained on {base}, and this run's model.path is {model_path}; "
            "set lora.init_from_any_base=True to continue it on this model anyway"
        )


def check_peft_config(config: dict, spec: LoraSpec, folder: str, num_layers: int) -> None:
    """Refuses an adapter the run's `lora` settings would not continue exactly (one line naming them)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise JsftError(f"lora.init_from: {folder} holds a {config.get('peft_type')} adapter, not LoRA")
    unsupported = [
        key
        for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication")
        if config.get(key)
    ]
    unsupported += ["use_dora"] if config.get("use_dora") else []
    unsupported += ["bias"] if config.get("bias", "none") != "none" else []
    if unsupported:
        raise JsftError(f"lora.init_from: {folder} uses PEFT options jsft does not support: {unsupported}")
    target = config.get("target_modules")
    if isinstance(target, str):
        targets = LoraSpec(rank=1, alpha=1, target_regex=target).resolve(num_layers).targets
    else:
        targets = tuple(t.rsplit(".", 1)[-1] for t in target or ())
    wanted = {
        "lora.rank": (int(config.get("r", 8)), spec.rank),
        "lora.alpha": (float(config.get("lora_alpha", 8)), spec.alpha),
        "lora.use_rslora": (bool(config.get("use_rslora", False)), spec.use_rslora),
        "lora.targets": (sorted(targets), sorted(spec.targets)),
    }
    differ = [f"{k}={theirs!r} (run has {ours!r})" for k, (theirs, ours) in wanted.items() if theirs != ours]
    if differ:
        raise JsftError(f"lora.init_from: {folder} was trained with {', '.join(differ)}; set the same")


def from_peft_tensors(tensors: dict[str, np.ndarray], layout: Layout, folder: str) -> dict[str, np.ndarray]:
    """The inverse of `peft_tensors`: host arrays for every trainable parameter of `layout`."""
    out = {}
    used = set()
    for name in sorted(layout.trainable):
        kernel, _, factor = name.rpartition(".")
        slices = []
        for layer, _ in _layers(layout, name):
            if factor in ("lora_a", "lora_b"):
                hf_name, _ = layout.names.to_hf(kernel, layer)
                key = f"{PEFT_PREFIX}{hf_name.removesuffix('.weight')}.lora_{factor[-1].upper()}.weight"
            else:
                hf_name, transform = layout.names.to_hf(name, layer)
                key = PEFT_PREFIX + hf_name
            if key not in tensors:
                raise JsftError(f"lora.init_from: {folder} has no tensor {key}")
            used.add(key)
            slices.append((key, tensors[key]))
        shape = layout.shapes[name].shape
        per_layer = shape[1:] if layout.names.is_stacked(name) else shape
        converted = []
        for key, tensor in slices:
            if factor in ("lora_a", "lora_b"):  # PEFT: A [r, in], B [out, r]
                value = tensor.T.reshape(per_layer)
            else:
                value = transform.to_jsft(tensor, per_layer)
            if value.shape != tuple(per_layer):
                raise JsftError(f"lora.init_from: {key} has shape {tensor.shape}, expected {per_layer}")
            converted.append(np.asarray(value, dtype=layout.shapes[name].dtype))
        out[name] = np.stack(converted) if layout.names.is_stacked(name) else converted[0]
    extra = sorted(set(tensors) - used)
    if extra:
        raise JsftError(f"lora.init_from: {folder} has tensors this run would not train, e.g. {extra[0]}")
    return out


def load_peft(folder: str, layout: Layout, mesh: Mesh) -> Params:
    """The trainable parameters of `layout` from a PEFT adapter folder, placed on `mesh`."""
    config, tensors = read_peft_folder(folder)
    check_peft_config(config, layout.lora, folder, layout.cfg.num_layers)
    host = from_peft_tensors(tensors, layout, folder)
    shardings = layout.shardings(mesh)
    return {name: jax.device_put(value, shardings[name]) for name, value in host.items()}
