"""A jsft checkpoint step as a Hugging Face model folder, and its upload to the Hub.

The folder holds safetensors weights, config.json, generation_config.json and the tokenizer files with
the chat template used in training, all taken from the checkpoint itself, so any kept step converts
even if the original model folder is gone (LoRA steps read their frozen base from it). `push_to_hub`
uploads exactly the files `export_files` vouches for; huggingface_hub reads the token (HF_TOKEN or a
prior `hf auth login`) itself, so it is never passed through or written by jsft.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from jsft import checkpoint, hf, models, paths, sharding
from jsft.errors import JsftError
from jsft.lora import peft

DTYPES = ("float32", "bfloat16")


def _open_step(checkpoint_dir: str, step: int | None):
    """(manager, step) of a kept step of a jsft checkpoint folder (the latest by default)."""
    if not epath.Path(checkpoint_dir).is_dir():
        raise JsftError(f"checkpoint folder {checkpoint_dir} does not exist")
    mngr = checkpoint.manager(checkpoint_dir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
        raise JsftError(f"no checkpoints in {checkpoint_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise JsftError(f"step {step} is not in {checkpoint_dir}; kept steps: {sorted(steps)}")
    return mngr, step


def _trained_params(mngr, step: int, layout: models.Layout, mesh) -> models.Params:
    """The trained parameters a step holds (all weights, or LoRA's factors and also-trained weights)."""
    shardings = layout.shardings(mesh)
    names = sorted(layout.trainable)
    abstract = {n: layout.shapes[n] for n in names}
    params, _, _ = checkpoint.restore_for_export(mngr, step, abstract, {n: shardings[n] for n in names})
    return params


def _base_revision(mngr, step: int, train_cfg: dict) -> str:
    """The base model's commit the run read (saved with each step), else its `model.revision`."""
    saved = checkpoint.read_json_item(mngr, step, "hf").get("revision")
    return saved or train_cfg["model"].get("revision", "")


def convert(
    checkpoint_dir: str,
    output_dir: str,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> str:
    """Writes a full Hugging Face model folder; a LoRA step's factors are merged into its base weights
    (read in float32 from the run's model folder: the original weights, not a quantized copy)."""
    paths.check_writable(output_dir, overwrite=overwrite)  # before the minutes of reading and merging
    mngr, step = _open_step(checkpoint_dir, step)
    files = checkpoint.hf_files(mngr, step)
    meta = checkpoint.read_json_item(mngr, step, "meta")
    layout, train_cfg = checkpoint.saved_layout(mngr, step)
    mesh = sharding.single_device_mesh()
    params = _trained_params(mngr, step, layout, mesh)
    if layout.lora:  # fold the factors into the base weights of the model folder
        model = train_cfg["model"]  # a Hub id is read through the cache, at the commit training read
        base_layout = models.Layout(layout.cfg)
        revision = _base_revision(mngr, step, train_cfg) or None
        base = models.load_params(model["path"], base_layout, mesh, revision=revision)
        params = layout.lora.merge(base, params)
        layout = base_layout
    dtype = dtype or train_cfg["model"]["param_dtype"]
    tensors = models.to_hf_tensors(params, layout, models.dtype_of(dtype))
    readme = model_card(train_cfg, step, meta.get("total_steps"))
    return write_folder(output_dir, tensors, files, readme, dtype, max_shard_bytes, overwrite=overwrite)


def convert_adapter(
    checkpoint_dir: str,
    output_dir: str,
    step: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes a LoRA step as a PEFT adapter folder: adapter_config.json and adapter_model.safetensors
    under PEFT's key names, which `peft.PeftModel.from_pretrained(base_model, output_dir)` loads."""
    paths.check_writable(output_dir, overwrite=overwrite)
    mngr, step = _open_step(checkpoint_dir, step)
    layout, train_cfg = checkpoint.saved_layout(mngr, step)
    if not layout.lora:
        raise JsftError(f"{checkpoint_dir} step {step} is full fine-tuning (lora.rank=0): it has no adapter")
    params = _trained_params(mngr, step, layout, sharding.single_device_mesh())
    host = {n: np.asarray(jax.device_get(v)) for n, v in params.items()}
    if dtype:
        host = {n: v.astype(models.dtype_of(dtype)) for n, v in host.items()}
    meta = checkpoint.read_json_item(mngr, step, "meta")
    return write_adapter(
        output_dir,
        host,
        layout,
        train_cfg["model"]["path"],
        readme=model_card(train_cfg, step, meta.get("total_steps"), library="peft"),
        revision=_base_revision(mngr, step, train_cfg),
        overwrite=overwrite,
    )


def write_adapter(
    output_dir: str,
    trained: dict,
    layout: models.Layout,
    base_model: str,
    readme: str = "",
    revision: str = "",
    overwrite: bool = False,
) -> str:
    """A PEFT adapter folder of `trained` (host arrays of `layout.trainable`), local or on an object store,
    put in place whole (`paths.replacing`)."""
    from safetensors.numpy import save_file

    tensors = peft.peft_tensors(trained, layout)
    with paths.replacing(output_dir, overwrite=overwrite) as folder:
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = peft.peft_config(layout, base_model, revision)
        epath.Path(folder, "adapter_config.json").write_text(json.dumps(config, indent=2))
        if readme:
            epath.Path(folder, "README.md").write_text(readme)
    return output_dir


def write_folder(
    output_dir: str,
    tensors: dict,
    files: dict[str, bytes],
    readme: str,
    dtype: str,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> str:
    """Writes a Hugging Face folder (local, or gs:// and other object stores): weights, `files`
    (config.json gets `dtype`; a generation_config.json is derived if absent) and README.md. The folder
    appears whole or not at all, and replaces a non-empty one only with `overwrite` (`paths.replacing`)."""
    hf_config = json.loads(files["config.json"])
    hf_config["dtype"] = dtype
    hf_config.pop("torch_dtype", None)
    files = {**files, "config.json": json.dumps(hf_config, indent=2).encode(), "README.md": readme.encode()}
    files.setdefault("generation_config.json", json.dumps(generation_config(hf_config), indent=2).encode())
    with paths.replacing(output_dir, overwrite=overwrite) as folder:
        hf.save_tensors(tensors, folder, max_shard_bytes)
        for name, content in files.items():
            epath.Path(folder, name).write_bytes(content)
    return output_dir


def generation_config(hf_config: dict) -> dict:
    """What transformers derives from config.json when a model folder has no generation_config.json."""
    tokens = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
    return {"_from_model_config": True, **tokens}


def export_files(folder: str) -> list[str]:
    """The files of an exported folder, after checking it is complete and consistent.

    This is what `push_to_hub` uploads: config.json of a supported model, every weight file its index
    names and no other, tokenizer files with a chat template, generation_config.json and README.md.
    """
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
    )
    models.ModelConfig.from_hf(hf.read_config(folder))
    weights = {os.path.relpath(f, folder) for f in hf.safetensors_files(folder)}
    stray = sorted(f for f in files if f.endswith(".safetensors") and f not in weights)
    absent = sorted(weights - set(files))
    if stray or absent:
        raise JsftError(
            f"{folder}: weight files {stray or absent} are {'not in the index' if stray else 'missing'}"
        )
    needed = ["generation_config.json", "tokenizer_config.json", "README.md"]
    missing = [name for name in needed if name not in files]
    if missing:
        raise JsftError(f"{folder}: missing {', '.join(missing)}")
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        has_template = "chat_template" in json.load(f)
    if not has_template and not {"chat_template.jinja", "chat_template.json"} & set(files):
        raise JsftError(f"{folder}: the tokenizer files have no chat template")
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    if pickles:
        raise JsftError(f"{folder}: refusing to upload pickle files {pickles}")
    return files


def check_repo_id(text: str) -> str:
    """`text` if it is an ORG/NAME model repo id the Hub accepts; checked before any converting."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as e:
        raise JsftError(f"--push_to_hub={text}: {e}") from e
    if text.count("/") != 1:
        raise JsftError(f"--push_to_hub={text!r} is not of the form ORG/NAME")
    return text


def push_to_hub(folder: str, repo_id: str) -> str:
    """Uploads the checked export folder to the Hub model repo `repo_id` (created if needed): its URL."""
    import huggingface_hub

    if paths.is_remote(folder):
        raise JsftError(f"push_to_hub uploads a local folder; export to a local output_dir, not {folder}")
    files = export_files(folder)
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            allow_patterns=files,
            commit_message="Upload model fine-tuned with jsft",
        )
    except OSError as e:  # huggingface_hub's HTTP and offline errors are OSErrors
        raise JsftError(f"push to {repo_id} failed: {e}") from e
    return commit.commit_url


def model_card(train_cfg: dict, step: int, total_steps: int | None, library: str = "transformers") -> str:
    """README.md of an export: the model, the data and the whole run config, with every local path cut
    to its file name (a card is published; the folders of the machine that trained it are private)."""
    public = _without_local_paths(train_cfg)
    return (
        f"---\nlibrary_name: {library}\ntags: [jsft, sft]\n---\n\n"
        f"# Fine-tuned with jsft\n\nSupervised fine-tuning of `{public['model']['path']}`, "
        f"exported at step {step} of {total_steps}.\n\n"
        f"Data mixture: {public['data']['mixer']}\n\n"
        "## Training config\n\n```json\n" + json.dumps(public, indent=2) + "\n```\n"
    )


def _without_local_paths(value):
    """`value` with each string that is an absolute local path (or names a file or folder here) replaced
    by its last component; Hub ids (`org/name`), gs:// paths and other strings stay as they are."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and "://" not in value and (os.path.isabs(value) or os.path.exists(value)):
        return os.path.basename(os.path.normpath(value)) or value
    return value
