"""Everything a run writes under output_dir goes through one path API: checked on a fake object store.

The fake `gs://` is fsspec's in-memory filesystem behind etils.epath, so any local-only call (open,
os.rename, os.makedirs) on a gs:// path would fail or leave a local `gs:` folder behind.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import TINY_MODEL, make_hf_family
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem

from jsft import export, models, paths, sharding
from jsft.config import default_config
from jsft.metrics import MetricsLog


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs:// served from memory for the test; the working directory is an empty folder to watch."""
    filesystem = FakeGCS()
    FakeGCS.store.clear()

    class Backend(backend._FileSystemSpecBackend):
        def fs(self, path):
            return filesystem

    monkeypatch.chdir(tmp_path)
    with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": Backend()}):
        yield filesystem
    assert os.listdir(tmp_path) == []  # nothing was written locally under a "gs:" name


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gs"])
def test_metrics_log_appends_lines(tmp_path, fake_gcs, remote):
    out = "gs://bucket/run" if remote else str(tmp_path.parent / f"{tmp_path.name}-local")
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    for resumed_at in (0, 2):  # a resumed run appends to the earlier lines
        log = MetricsLog(out, total_steps=4, initial_step=resumed_at)
        log.write({"step": resumed_at + 1, "loss": 1.5})
        log.write({"step": resumed_at + 2, "loss": 1.0})
        log.close()
    lines = (epath.Path(out) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_overwrite_moves_the_previous_run_aside_on_the_store(fake_gcs):
    from jsft.checkpoint import Checkpointer

    out = epath.Path("gs://bucket/run")
    (out / "checkpoints" / "4").mkdir(parents=True)
    (out / "checkpoints" / "4" / "marker").write_text("old")
    (out / "metrics.jsonl").write_text('{"step": 4}\n')
    cfg = default_config()
    cfg.output_dir = str(out)
    cfg.checkpoint.resume, cfg.checkpoint.overwrite = False, True
    checkpointer = Checkpointer.__new__(Checkpointer)  # the move alone: Orbax itself needs a real store
    checkpointer.cfg, checkpointer.directory = cfg, str(out / "checkpoints")
    checkpointer._move_previous_run_aside()
    moved = [p for p in out.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(moved) == 1 and not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (moved[0] / "4" / "marker").read_text() == "old"
    assert (moved[0] / "metrics.jsonl").read_text() == '{"step": 4}\n'


def test_export_writes_a_loadable_folder_to_the_store(tmp_path, fake_gcs):
    source = tmp_path.parent / f"{tmp_path.name}-source"
    make_hf_family(source, "qwen2", vocab_size=384)
    cfg, _ = models.config_from_folder(str(source))
    layout = models.Layout(cfg)
    params = models.load_params(str(source), layout, sharding.single_device_mesh())
    tensors = models.to_hf_tensors(params, layout, ml_dtypes.bfloat16)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    files = {name: (TINY_MODEL / name).read_bytes() for name in tokenizer_files}
    files["config.json"] = (source / "config.json").read_bytes()
    out = export.write_folder("gs://bucket/export", tensors, files, "# card\n", "bfloat16", 20_000)
    names = sorted(p.name for p in epath.Path(out).iterdir())
    assert (
        "model.safetensors.index.json" in names and "README.md" in names and "generation_config.json" in names
    )
    # the store's copy is the folder: bring it down and load it
    local = tmp_path.parent / f"{tmp_path.name}-download"
    local.mkdir()
    for name in names:
        (local / name).write_bytes(epath.Path(out, name).read_bytes())
    assert export.export_files(str(local)) == sorted(names)
    again = models.load_params(str(local), layout, sharding.single_device_mesh())
    for name, value in jax.device_get(again).items():
        assert value.dtype == params[name].dtype and value.shape == params[name].shape, name
    with pytest.raises(export.JsftError, match="local folder"):
        export.push_to_hub(out, "org/name")
    assert paths.is_remote(out)


def test_data_cache_on_the_store_is_mirrored_locally(tmp_path, fake_gcs, monkeypatch):
    """The first run encodes and uploads; a host with an empty local cache reads the store's copy."""
    import transformers
    from conftest import TINY_DATA

    from jsft import data
    from jsft.data import cache, preprocess

    local_caches = [tmp_path.parent / f"{tmp_path.name}-host{i}" for i in range(2)]
    data_cfg = default_config().data
    data_cfg.mixer = ((str(TINY_DATA / "train.jsonl"), 60),)
    data_cfg.max_seq_length, data_cfg.cache_dir, data_cfg.num_proc = 128, "gs://bucket/cache", 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    monkeypatch.setenv("JSFT_CACHE", str(local_caches[0]))
    first = data.prepare(data_cfg, tokenizer, seed=0)
    (entry,) = epath.Path("gs://bucket/cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        [f"{a}.npy" for a in cache._ARRAYS] + ["stats.json"]
    )
    monkeypatch.setenv("JSFT_CACHE", str(local_caches[1]))
    monkeypatch.setattr(preprocess, "encode_mixture", lambda *a, **k: pytest.fail("encoded again"))
    second = data.prepare(data_cfg, tokenizer, seed=0)
    assert len(second) == len(first) == 60
    for i in (0, 59):
        for key, value in first[i].items():
            np.testing.assert_array_equal(second[i][key], value)
