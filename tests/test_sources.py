"""Every documented form of a data source gives the same rows and the same encoded tokens as the JSONL
it was written from: a .jsonl, .json or .parquet file, a folder of them, and a Hub data set name
(`name`, `name:split`, `name:config:split`) read offline from a warm `datasets` cache. No network."""

from __future__ import annotations

import json

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import transformers
from conftest import TINY_DATA, TINY_MODEL

from jsft.data import encode_mixture, sources
from jsft.errors import DataError

ROWS = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()[:24]]
HUB_NAME = "jsft-test/tiny_chat"


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture
def offline_datasets_cache(tmp_path, monkeypatch):
    """`datasets` offline (as `HF_HUB_OFFLINE=1`), with its cache in the test's own folder."""
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def cache_hub_dataset(cache, tmp_path, name: str, splits: dict[str, list]) -> None:
    """What `load_dataset(name)` leaves in the `datasets` cache after a download: the prepared Arrow
    tables of each split under `<namespace>___<name>/default/<version>/<hash>/`."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, short = name.split("/")
    files = {
        split: [write_parquet(tmp_path / "hub_src" / f"{split}.parquet", r)] for split, r in splits.items()
    }
    builder = Parquet(
        cache_dir=str(cache), dataset_name=short, config_id="default", data_files=files, hash="0" * 16
    )
    builder.download_and_prepare()
    (cache / short).rename(cache / f"{namespace}___{short}")


def read_all(source: str) -> list:
    """The rows one mixer entry of the whole source draws, as conversations, in order."""
    (drawn,) = sources.mix(((source, 1.0),), seed=0)
    assert drawn.format.name == "messages"
    assert sorted(drawn.indices) == list(range(len(drawn.rows)))
    out = []
    for batch in drawn.rows.rows(np.arange(len(drawn.rows)), batch_size=5):
        out += [drawn.format.convert(sources.parse_row(row, where)).messages for row, where in batch]
    return out


def encoded(tok, source: str):
    data = encode_mixture(((source, 1.0),), tok, 128, None, 0, 0.0, num_proc=1)
    return data.token_ids, data.trained, data.row_starts


def test_every_local_form_reads_the_same_rows_and_tokens(tmp_path, tok, offline_datasets_cache):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, indent=1))
    parquet = write_parquet(tmp_path / "rows.parquet", ROWS)
    # folders: every data file under them, nested too, in sorted path order
    write_jsonl(tmp_path / "jsonl_dir" / "a.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "jsonl_dir" / "b" / "c.jsonl", ROWS[10:])
    write_parquet(tmp_path / "parquet_dir" / "part-0.parquet", ROWS[:7])
    write_parquet(tmp_path / "parquet_dir" / "part-1.parquet", ROWS[7:])
    (tmp_path / "parquet_dir" / "notes.txt").write_text("not data")  # ignored
    expected_tokens = encoded(tok, jsonl)
    assert len(expected_tokens[2]) == len(ROWS) + 1
    for source in (jsonl, str(array), parquet, str(tmp_path / "jsonl_dir"), str(tmp_path / "parquet_dir")):
        assert read_all(source) == [r["messages"] for r in ROWS], source
        for got, expected in zip(encoded(tok, source), expected_tokens, strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=source)


def test_a_hub_name_reads_its_splits_offline_from_a_warm_cache(tmp_path, tok, offline_datasets_cache):
    cache_hub_dataset(offline_datasets_cache, tmp_path, HUB_NAME, {"train": ROWS[:16], "test": ROWS[16:]})
    expected = encoded(tok, write_jsonl(tmp_path / "train.jsonl", ROWS[:16]))
    for source, rows in (
        (HUB_NAME, ROWS[:16]),  # the train split
        (f"{HUB_NAME}:test", ROWS[16:]),
        (f"{HUB_NAME}:default:test", ROWS[16:]),
    ):
        assert read_all(source) == [r["messages"] for r in rows], source
    for got, want in zip(encoded(tok, HUB_NAME), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(DataError, match="not a local path, and the Hub load failed"):
        sources.load_source("jsft-test/not_cached")
    with pytest.raises(DataError, match="expected name, name:split or name:config:split"):
        sources.load_source(f"{HUB_NAME}:default:test:extra")


def test_a_folder_without_data_files_or_with_both_kinds_is_an_error(tmp_path, offline_datasets_cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no data here")
    with pytest.raises(DataError, match="no .jsonl, .json or .parquet files"):
        sources.load_source(str(tmp_path / "empty"))
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ROWS[:2])
    write_parquet(tmp_path / "mixed" / "b.parquet", ROWS[2:4])
    with pytest.raises(DataError, match="mixes json and parquet files"):
        sources.load_source(str(tmp_path / "mixed"))
