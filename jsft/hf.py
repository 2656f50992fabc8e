"""Hugging Face model folders: config.json and safetensors in, the same out; Hub ids fetched into the cache.

Only safetensors are read or fetched (never pickle). Tensors are memory-mapped one at a time, so reading a
checkpoint holds at most one tensor in host memory beyond what has been placed on devices. The
reader is our own (a few lines over the documented header format) because `safetensors`' numpy
backend cannot return bfloat16, the dtype most checkpoints ship in.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator

import filelock
import huggingface_hub
import ml_dtypes
import numpy as np
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.numpy import save_file

from jsft.errors import ModelFolderError, one_line

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

# The files a checkpoint carries to make each step exportable on its own. Plain names from this list only,
# checked when a run saves them and whenever a checkpoint is read (export, chat): a name such as `../x` or
# an absolute path, from a damaged or hostile checkpoint, could otherwise write outside the folder.
ASSET_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# What a Hub id fetches besides the weights: exact top-level names, so pickles (`*.bin`, `*.pt`,
# `original/*.pth`) and duplicate weight files (`consolidated.safetensors`) never match.
HUB_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    SAFETENSORS_INDEX,
    *TOKENIZER_FILES,
)


def check_asset_names(names, where: str) -> None:
    """Refuses any asset file name not in `ASSET_FILES`, naming it and where it came from."""
    for name in names:
        if name not in ASSET_FILES:
            raise ModelFolderError(
                f"{where}: the asset file name {name!r} is not one jsft carries in a checkpoint "
                f"({', '.join(ASSET_FILES)})"
            )


def resolved_revision(path: str, folder: str) -> str:
    """The commit `resolve_model(path)` gave `folder` at (its snapshot's name); "" for a local folder."""
    return "" if os.path.isdir(path) else os.path.basename(os.path.normpath(folder))


def resolve_model(path: str, revision: str | None = None) -> str:
    """The local folder of `model.path`: a folder as given, or a Hub id's snapshot in the Hugging Face cache.

    A Hub id fetches only `HUB_METADATA_FILES` and the safetensors the index names (or
    `model.safetensors`): never pickles. The token is huggingface_hub's own (HF_TOKEN or `hf auth
    login`), so jsft never sees or writes it; with HF_HUB_OFFLINE=1 a warm cache is read without any
    network. The processes of one host take turns through a file lock in the cache, so one downloads
    and the others find the files there; each host fills its own cache (HF_HOME).
    """
    if os.path.isdir(path):
        if revision:
            raise ModelFolderError(
                f"model.revision={revision!r} is for Hub ids, but model.path {path} is a local folder"
            )
        return path
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelFolderError(
            f"model folder {path} does not exist, and it is not a Hub id (org/name)"
        ) from None
    name = f"{path}@{revision}" if revision else path
    try:
        with _host_lock(path):
            folder = huggingface_hub.snapshot_download(
                path, revision=revision, allow_patterns=list(HUB_METADATA_FILES)
            )
            weights = _weight_files(folder, name)
            # The commit just resolved, so a branch that moves meanwhile cannot mix two commits.
            folder = huggingface_hub.snapshot_download(
                path, revision=os.path.basename(folder), allow_patterns=weights
            )
    except OSError as e:  # huggingface_hub's HTTP, offline and incomplete-cache errors are all OSErrors
        raise ModelFolderError(
            f"{name} is no local folder, and fetching it from the Hub failed: {one_line(e)}"
        ) from None
    missing = [w for w in weights if not os.path.isfile(os.path.join(folder, w))]
    if missing:
        where = (
            "the Hugging Face cache (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else "the Hub"
        )
        raise ModelFolderError(
            f"Hub model {name} has no safetensors weights in {where} (missing {', '.join(missing[:3])}); "
            "jsft never loads pickle weights (*.bin, *.pt)"
        )
    return folder


def _weight_files(folder: str, name: str) -> list[str]:
    """The safetensors files a fetched snapshot needs: the shards its index lists, or `model.safetensors`."""
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if not os.path.isfile(index):
        return [SAFETENSORS_SINGLE]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    bad = [s for s in shards if not s.endswith(".safetensors")]
    if bad:
        raise ModelFolderError(f"Hub model {name}: {SAFETENSORS_INDEX} names non-safetensors files {bad[:3]}")
    return shards


def _host_lock(repo_id: str) -> contextlib.AbstractContextManager:
    """One lock per repo in this host's cache; none offline, where nothing is written (read-only caches)."""
    if hub_constants.HF_HUB_OFFLINE:
        return contextlib.nullcontext()
    lock_dir = os.path.join(hub_constants.HF_HUB_CACHE, ".locks", "jsft")
    os.makedirs(lock_dir, exist_ok=True)
    return filelock.FileLock(os.path.join(lock_dir, repo_id.replace("/", "--") + ".lock"))


def read_config(path: str) -> dict:
    """The parsed `config.json` of a model folder."""
    if not os.path.isdir(path):
        raise ModelFolderError(f"model folder {path} does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelFolderError(f"model folder {path} has no config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            parsed = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ModelFolderError(f"{config_file} is not valid JSON ({one_line(e)})") from None
    if not isinstance(parsed, dict):
        raise ModelFolderError(f"{config_file} holds a {type(parsed).__name__}, not a JSON object")
    return parsed


def safetensors_files(path: str) -> list[str]:
    """The weight files of a folder: `model.safetensors`, or the shards listed in its index."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, SAFETENSORS_SINGLE)
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
    """(tensor name -> dtype, shape, data_offsets; where the data starts), or a one-line ModelFolderError."""
    file_size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if 8 + size > file_size:
                raise ValueError(f"its header claims {size} bytes")
            header = json.loads(f.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{file} is not a readable safetensors file ({one_line(e)})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def check_weights(path: str) -> None:
    """Every weight file of a folder is whole: a readable header, and every byte its tensors need (a copy
    cut short fails here, in one line naming the file, before any data is encoded)."""
    for file in safetensors_files(path):
        if not os.path.isfile(file):
            raise ModelFolderError(f"{file} is missing (named in {SAFETENSORS_INDEX})")
        check_safetensors(file)


def check_safetensors(file: str) -> None:
    """A readable header, and every byte the file's tensors need."""
    header, start = _header(file)
    needed = start + max((t["data_offsets"][1] for t in header.values()), default=0)
    held = os.path.getsize(file)
    if held < needed:
        raise ModelFolderError(f"{file} is cut short: it holds {held} bytes of the {needed} its tensors need")


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


def save_tensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int = 5 * 10**9) -> None:
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
