"""Converts a jsft checkpoint step into a Hugging Face model folder.

    python tools/convert_to_hf.py --checkpoint_dir=runs/tiny/checkpoints --output_dir=out/tiny-hf [--step=N]

The folder holds safetensors weights, config.json, generation_config.json and the tokenizer files with
the chat template used in training, all taken from the checkpoint itself, so any kept step converts
even if the original model folder is gone.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

import jax

from jsft import checkpoint, hf, models, sharding
from jsft.errors import JsftError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def convert(
    checkpoint_dir: str,
    output_dir: str,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    if not os.path.isdir(checkpoint_dir):
        raise JsftError(f"checkpoint folder {checkpoint_dir} does not exist")
    mngr = checkpoint.manager(checkpoint_dir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
        raise JsftError(f"no checkpoints in {checkpoint_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise JsftError(f"step {step} is not in {checkpoint_dir}; kept steps: {sorted(steps)}")
    files = {
        name: base64.b64decode(text)
        for name, text in checkpoint.read_json_item(mngr, step, "hf")["files"].items()
    }
    meta = checkpoint.read_json_item(mngr, step, "meta")
    hf_config = json.loads(files["config.json"])
    train_cfg = meta["config"]
    cfg = models.ModelConfig.from_hf(
        hf_config, param_dtype=models.dtype_of(train_cfg["model"]["param_dtype"])
    )
    layout = models.Layout(cfg, hf_config["model_type"])
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    params, _, _ = checkpoint.restore_for_export(mngr, step, layout.shapes, layout.shardings(mesh))
    dtype = dtype or train_cfg["model"]["param_dtype"]
    tensors = models.to_hf_tensors(params, layout, models.dtype_of(dtype))

    os.makedirs(output_dir, exist_ok=True)
    hf.save_tensors(tensors, output_dir, max_shard_bytes)
    hf_config["dtype"] = dtype
    hf_config.pop("torch_dtype", None)
    files["config.json"] = json.dumps(hf_config, indent=2).encode()
    for name, content in files.items():
        with open(os.path.join(output_dir, name), "wb") as f:
            f.write(content)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(model_card(train_cfg, step, meta.get("total_steps")))
    return output_dir


def model_card(train_cfg: dict, step: int, total_steps: int | None) -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [jsft, sft]\n---\n\n"
        f"# Fine-tuned with jsft\n\nSupervised fine-tuning of `{train_cfg['model']['path']}`, "
        f"exported at step {step} of {total_steps}.\n\n"
        f"Data mixture: {train_cfg['data']['mixer']}\n\n"
        "## Training config\n\n```json\n" + json.dumps(train_cfg, indent=2) + "\n```\n"
    )


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for suffix, scale in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True, help="<output_dir>/checkpoints of a jsft run")
    parser.add_argument("--output_dir", required=True, help="where to write the Hugging Face folder")
    parser.add_argument("--step", type=int, default=None, help="a kept step (default: the latest)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as trained)"
    )
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    args = parser.parse_args()
    try:
        out = convert(
            args.checkpoint_dir, args.output_dir, args.step, args.dtype, parse_size(args.max_shard_size)
        )
    except JsftError as e:
        sys.exit(f"convert_to_hf: error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
