"""Hugging Face model folders: config.json and safetensors in, the same out.

Only safetensors are read (never pickle). Tensors are memory-mapped one at a time, so reading a
checkpoint holds at most one tensor in host memory beyond what has been placed on devices. The
reader is our own (a few lines over the documented header format) because `safetensors`' numpy
backend cannot return bfloat16, the dtype most checkpoints ship in.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jsft.errors import JsftError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


class ModelFolderError(JsftError):
    """A model folder that cannot be read, named in one line."""


def read_config(path: str) -> dict:
    """The parsed `config.json` of a model folder."""
    if not os.path.isdir(path):
        raise ModelFolderError(f"model folder {path} does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelFolderError(f"model folder {path} has no config.json")
    with open(config_file) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    """The weight files of a folder: `model.safetensors`, or the shards listed in its index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(n.endswith(".bin") or n.endswith(".pt") for n in os.listdir(path)):
        raise ModelFolderError(
            f"model folder {path} has only pickle weights (*.bin), which jsft does not load; convert them "
            "with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise ModelFolderError(f"model folder {path} has no model.safetensors or model.safetensors.index.json")


def _header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, memory-mapped array) for every tensor of the folder, file by file."""
    for file in safetensors_files(path):
        header, data_start = _header(file)
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ModelFolderError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            dtype = np.dtype(_DTYPES[info["dtype"]])
            if end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ModelFolderError(f"{file}: tensor {name} has a size that does not match its shape")
            yield name, np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def save_tensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model.safetensors`, or numbered shards plus `model.safetensors.index.json` when large."""
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
