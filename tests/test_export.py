"""The Hugging Face folder `jsft.export` writes, and what `--push_to_hub` uploads (no network)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import transformers
from conftest import ROOT, TINY_MODEL, make_hf_family

from jsft import export, hf, models, sharding
from jsft.errors import JsftError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def exported(tmp_path):
    """(source folder, export folder): a tiny tied Qwen2 written back in bfloat16 as several shards."""
    source = tmp_path / "source"
    make_hf_family(source, "qwen2", vocab_size=384)  # the tiny tokenizer's vocabulary
    cfg, _ = models.config_from_folder(str(source))
    layout = models.Layout(cfg)
    params = models.load_params(str(source), layout, sharding.single_device_mesh())
    tensors = models.to_hf_tensors(params, layout, ml_dtypes.bfloat16)
    files = {name: (TINY_MODEL / name).read_bytes() for name in TOKENIZER_FILES}
    files["config.json"] = (source / "config.json").read_bytes()
    out = export.write_folder(
        str(tmp_path / "export"), tensors, files, "# card\n", "bfloat16", max_shard_bytes=20_000
    )
    return source, out


def test_export_is_a_sharded_folder_transformers_loads(exported):
    source, out = exported
    index = json.loads(pathlib.Path(out, "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    exported_config = hf.read_config(out)
    assert exported_config.pop("dtype") == "bfloat16"
    assert exported_config == {k: v for k, v in hf.read_config(str(source)).items() if k != "dtype"}
    assert json.loads(pathlib.Path(out, "generation_config.json").read_text())["eos_token_id"] == 2
    assert export.export_files(out) == sorted(os.listdir(out))

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = dict(hf.iter_tensors(str(source)))
    for name, tensor in model.state_dict().items():
        if name in original:
            expected = original[name].astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(tensor.float().numpy(), expected, err_msg=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == transformers.AutoTokenizer.from_pretrained(TINY_MODEL).chat_template


def test_incomplete_folders_are_not_uploaded(exported):
    _, out = exported
    stray = os.path.join(out, "model-00009-of-00009.safetensors")
    open(stray, "wb").close()
    with pytest.raises(JsftError, match="not in the index"):
        export.export_files(out)
    os.remove(stray)
    os.remove(os.path.join(out, "chat_template.jinja"))
    with pytest.raises(JsftError, match="no chat template"):
        export.export_files(out)


def test_push_to_hub_goes_through_huggingface_hub_and_never_writes_the_token(exported):
    """Offline, the real upload path must reach huggingface_hub's HTTP layer and fail there, cleanly."""
    _, out = exported
    token = "hf_jsftTestTokenThatMustNotLeak"
    script = "import sys; from jsft import export; export.push_to_hub(sys.argv[1], sys.argv[2])"
    proc = subprocess.run(
        [sys.executable, "-c", script, out, "jsft-test/tiny-sft"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": token},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "JsftError: push to jsft-test/tiny-sft failed" in proc.stderr
    assert "offline mode is enabled" in proc.stderr
    for name in os.listdir(out):
        assert token.encode() not in pathlib.Path(out, name).read_bytes(), name


def test_push_to_hub_repo_id_is_checked_before_converting(tmp_path):
    assert export.check_repo_id("my-org/tiny-sft") == "my-org/tiny-sft"
    for bad in ("tiny-sft", "my org/tiny", "a/b/c"):
        with pytest.raises(JsftError, match="--push_to_hub"):
            export.check_repo_id(bad)
    # the command line refuses it before touching the (absent) checkpoint folder
    proc = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/tools/convert_to_hf.py",
            f"--checkpoint_dir={tmp_path}/nope",
            f"--output_dir={tmp_path}/out",
            "--push_to_hub=a/b/c",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--push_to_hub" in proc.stderr and "does not exist" not in proc.stderr
    assert not (tmp_path / "out").exists()
