"""The encoded rows on disk: their format, the key of everything they depend on, and atomic writes.

Rows are stored flat: `token_ids` (int32) and `trained` (bool) of every kept row back to back,
`row_starts` (int64, rows + 1 entries) and `row_sources` (int32, the mixer entry of each row).
`EncodedData` reads them lazily as shifted examples. A folder is complete once its `stats.json` is
there: it is written into a temporary sibling and renamed into place, so concurrent builders cannot
corrupt it, and an object-store copy is written with `stats.json` last.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from etils import epath

from jsft import config
from jsft.data import sources
from jsft.data.templates import resolve_template
from jsft.errors import DataError

CACHE_VERSION = 2  # bump when the stored format or the encoding changes
_ARRAYS = ("token_ids", "trained", "row_starts", "row_sources")


def shifted(token_ids: np.ndarray, trained: np.ndarray) -> dict[str, np.ndarray]:
    """One encoded conversation as the step's example: `input_ids` (tokens 0..n-2), `target_ids`
    (tokens 1..n-1, 0 where untrained) and `loss_mask` (1 where the target is trained). Shifting each
    conversation before packing means no target ever crosses into the next example."""
    targets_trained = trained[1:]
    return {
        "input_ids": np.array(token_ids[:-1], np.int32),
        "target_ids": np.where(targets_trained, token_ids[1:], 0).astype(np.int32),
        "loss_mask": targets_trained.astype(np.int32),
    }


@dataclasses.dataclass
class EncodedData(Sequence):
    """Encoded rows, indexed as shifted examples: `input_ids`, `target_ids`, `loss_mask` (int32)."""

    token_ids: np.ndarray
    trained: np.ndarray
    row_starts: np.ndarray
    row_sources: np.ndarray
    stats: dict

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start, end = int(self.row_starts[index]), int(self.row_starts[index + 1])
        return shifted(self.token_ids[start:end], self.trained[start:end])

    @property
    def examples(self) -> EncodedData:
        """The examples themselves (this object is a sequence of them)."""
        return self

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example after the shift."""
        return np.diff(self.row_starts) - 1

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def trained_tokens(self) -> int:
        return int(self.trained.sum() - self.trained[self.row_starts[:-1]].sum()) if len(self) else 0

    @property
    def drops(self) -> collections.Counter:
        return collections.Counter(self.stats["drops"])

    @property
    def total_rows(self) -> int:
        return self.stats["total_rows"]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the full tokenizer definition and special tokens."""
    backend = getattr(tokenizer, "_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map], sort_keys=True, default=str)
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def template_text(tokenizer, chat_template: str | None) -> str:
    """The template that will actually render rows: the chosen one or the tokenizer's own."""
    try:
        return tokenizer.get_chat_template(resolve_template(chat_template))
    except ValueError as e:
        raise DataError(f"{e} Set data.chat_template to 'tulu', 'chatml' or a Jinja file.") from None


def key_for(data_cfg, tokenizer, *, seed: int, mixer=None) -> str:
    """`cache_key` of the config's `data` group (`mixer` defaults to `data_cfg.mixer`): the one mapping
    from settings to key, shared by the encoder and the planner that looks the cache up."""
    return cache_key(
        tuple(data_cfg.mixer if mixer is None else mixer),
        tokenizer,
        chat_template=data_cfg.chat_template,
        max_seq_length=data_cfg.max_seq_length,
        train_on=data_cfg.train_on,
        seed=seed,
        on_unlocated_turn=data_cfg.on_unlocated_turn,
        max_row_chars=data_cfg.max_row_chars,
    )


def cache_key(
    mixer,
    tokenizer,
    *,
    chat_template,
    max_seq_length: int,
    train_on: str,
    seed: int,
    on_unlocated_turn: str = "drop_row",
    max_row_chars: int = config.MAX_ROW_CHARS,
) -> str:
    """The hash of everything the encoded rows depend on (sources by content, amounts by type too)."""
    entries = [config.mixer_entry(e) for e in mixer]
    parts = {
        "version": CACHE_VERSION,
        "sources": [(sources.fingerprint(s), repr(a), json.dumps(f, sort_keys=True)) for s, a, f in entries],
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_text(tokenizer, chat_template),
        "max_seq_length": max_seq_length,
        "train_on": train_on,
        "on_unlocated_turn": on_unlocated_turn,
        "max_row_chars": max_row_chars,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("JSFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jsft", "data"))


def save(data: EncodedData, folder: str) -> None:
    """Writes the arrays and stats into a temporary sibling folder, then renames it into place."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for name in _ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), getattr(data, name))
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(data.stats, f, indent=1)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "stats.json")):  # not another process winning the race
            raise


def load(folder: str) -> EncodedData:
    """Maps a cached data set's arrays into memory (read-only, shared between readers)."""
    arrays = {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r") for name in _ARRAYS}
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    return EncodedData(stats=stats, **arrays)


def download(shared: epath.Path, folder: str) -> None:
    """Copies a finished remote cache entry into `folder`, atomically (a sibling, then a rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for name in [f"{a}.npy" for a in _ARRAYS] + ["stats.json"]:
            with (shared / name).open("rb") as source, open(os.path.join(tmp, name), "wb") as sink:
                shutil.copyfileobj(source, sink, 64 * 2**20)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "stats.json")):  # not another process winning the race
            raise


def upload(folder: str, shared: epath.Path) -> None:
    """Copies a local cache entry to the store; stats.json last, since readers take it as "complete"."""
    shared.mkdir(parents=True, exist_ok=True)
    for name in [f"{a}.npy" for a in _ARRAYS] + ["stats.json"]:
        with open(os.path.join(folder, name), "rb") as source, (shared / name).open("wb") as sink:
            shutil.copyfileobj(source, sink, 64 * 2**20)
