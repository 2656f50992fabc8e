"""Data sources, their row formats, and the mixer that draws from them.

A source is a local .jsonl/.json/.parquet file or folder, or a Hugging Face Hub data set name
(`name`, `name:split` or `name:config:split`). JSON files are read line by line by jsft itself, so
each row keeps exactly the structure it was written with (a columnar reader would give every tool
call the union of all rows' argument names) and a broken line is reported by file and line number.

A mixer entry is `(source, amount)` or `(source, amount, format)`. The format is detected from the
columns when not given; give it as a name (`"prompt_completion"`) or as a dict naming the format and
the columns that hold its fields: `{"format": "prompt_completion", "prompt": "question",
"completion": "answer"}`. Formats and their fields (defaults are the field names):
- messages: messages, tools (optional): a list of {role, content, ...}; role system, user,
  assistant or tool; assistant messages may have tool_calls and reasoning_content.
- prompt_messages: prompt, messages, tools: `prompt` is the first user turn unless `messages`
  already starts with it (ultrachat_200k, no_robots).
- prompt_completion: prompt, completion, tools: each a string (a user or an assistant turn) or a
  list of messages; only the completion's assistant turns are trained.
- sharegpt: conversations ([{from, value}], from human/gpt/system/tool/observation).
- alpaca: instruction, input, output.
- text: text: a plain document, every token trained (continued pretraining mixed into SFT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import huggingface_hub
import numpy as np

from jsft.config import FORMATS, mixer_entry, parse_format
from jsft.errors import DataError, one_line

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
}
# Integer amounts at most this large and below this fraction of their source look like a mistyped fraction.
_AMBIGUOUS_COUNT, _AMBIGUOUS_SHARE = 10, 0.01


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A row as a chat: assistant turns from message `trainable_from` on are trained."""

    messages: object
    tools: object = None
    trainable_from: int = 0


@dataclasses.dataclass(frozen=True)
class Document:
    """A row as plain text, every token trained."""

    text: object


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """A format and the column of each of its fields."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (field, column)

    def describe(self) -> str:
        renamed = {f: c for f, c in self.columns if f != c}
        return self.name + (f" {renamed}" if renamed else "")

    def convert(self, row: dict) -> Conversation | Document:
        """The row as a Conversation or Document; malformed values are left for the encoder to reject."""
        fields = {field: row.get(column) for field, column in self.columns}
        if self.name == "text":
            return Document(fields["text"])
        if self.name == "messages":
            return Conversation(fields["messages"], fields["tools"])
        if self.name == "prompt_messages":
            return Conversation(_prompt_and_messages(fields["prompt"], fields["messages"]), fields["tools"])
        if self.name == "prompt_completion":
            prompt = _as_messages(fields["prompt"], "user")
            completion = _as_messages(fields["completion"], "assistant")
            return Conversation(prompt + completion, fields["tools"], trainable_from=len(prompt))
        if self.name == "sharegpt":
            return Conversation(sharegpt_messages(fields["conversations"]))
        prompt = "\n\n".join(p for p in (fields["instruction"], fields["input"]) if isinstance(p, str) and p)
        return Conversation(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
        )


def _prompt_and_messages(prompt: object, messages: object) -> object:
    """`messages` as is when its first turn after any system messages is the prompt, else with it inserted."""
    if not isinstance(messages, list):
        return messages
    leading = 0
    while (
        leading < len(messages)
        and isinstance(messages[leading], dict)
        and messages[leading].get("role") == "system"
    ):
        leading += 1
    first = messages[leading] if leading < len(messages) else None
    if isinstance(first, dict) and first.get("role") == "user" and first.get("content") == prompt:
        return messages
    return messages[:leading] + _as_messages(prompt, "user") + messages[leading:]


def _as_messages(value: object, role: str) -> list:
    """A string as one message of `role`; a list is taken as messages already."""
    if isinstance(value, list):
        return value
    return [{"role": role, "content": value}]


def sharegpt_messages(turns: object) -> object:
    """ShareGPT `conversations` ({from, value}) in the messages format."""
    if not isinstance(turns, list):
        return turns
    return [
        {"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
        if isinstance(t, dict)
        else t
        for t in turns
    ]


def row_messages(row: dict) -> object:
    """A messages, ShareGPT or Alpaca row's conversation in the messages format (detected by its keys)."""
    return detect_format("row", list(row), None).convert(row).messages


def detect_format(source: str, columns: list[str], spec: object) -> RowFormat:
    """The row format of a source: the one given, or the first whose required columns it has."""
    name, mapping = parse_format(spec, f"mixer entry for {source}")
    for candidate in [name] if name else FORMATS:
        required, optional = FORMATS[candidate]
        if all(mapping.get(f, f) in columns for f in required):
            fields = required + optional
            return RowFormat(candidate, tuple((f, mapping.get(f, f)) for f in fields))
    wanted = " + ".join(mapping.get(f, f) for f in FORMATS[name][0]) if name else "a known format"
    raise DataError(
        f"data source {source}: expected {wanted} but found columns {', '.join(columns) or '(none)'}; "
        "name the format and its columns as the mixer entry's third element, e.g. "
        "(source, 1.0, {'format': 'prompt_completion', 'prompt': 'question', 'completion': 'answer'})"
    )


class JsonRows:
    """Rows of local JSON files: JSON Lines indexed by byte offset, JSON arrays held in memory.

    Lines travel as raw bytes (parsed by `parse_row` in the encoding workers) with a `file line N` label.
    """

    def __init__(self, files: list[str]):
        self.parts: list[tuple[str, list | tuple[np.ndarray, np.ndarray]]] = []
        for path in files:
            try:
                self.parts.append((path, self._read(path)))
            except OSError as e:
                raise DataError(f"data file {path}: cannot read it: {one_line(e, with_type=True)}") from None
        self.starts = np.cumsum(
            [0] + [len(rows if isinstance(rows, list) else rows[0]) for _, rows in self.parts]
        )

    @staticmethod
    def _read(path: str) -> list | tuple[np.ndarray, np.ndarray]:
        """A JSON array's rows, or (byte offsets, line numbers) of a JSON Lines file's non-blank lines."""
        if path.endswith(".json"):
            with open(path, "rb") as f:
                is_array = f.read(4096).lstrip().startswith(b"[")
            if is_array:
                try:
                    with open(path, encoding="utf-8") as f:
                        return list(json.load(f))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"data file {path}: not valid JSON: {e}") from None
        offsets, numbers, position = [], [], 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    numbers.append(number)
                position += len(line)
        return np.array(offsets, np.int64), np.array(numbers, np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def column_names(self) -> list[str]:
        """The keys of the first row."""
        if not len(self):
            return []
        row, where = next(self.rows(np.zeros(1, np.int64), 1))[0]
        row = parse_row(row, where)
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        return list(row)

    def rows(self, indices: np.ndarray, batch_size: int) -> Iterator[list[tuple[object, str]]]:
        """Batches of (row, or a line's JSON bytes; where it is), in the order of `indices`."""
        batch = []
        with contextlib.ExitStack() as stack:
            handles = {}
            for index in indices:
                part = int(np.searchsorted(self.starts, index, side="right")) - 1
                path, rows = self.parts[part]
                local = int(index - self.starts[part])
                if isinstance(rows, list):
                    batch.append((rows[local], f"{path} item {local}"))
                else:
                    try:
                        if path not in handles:
                            handles[path] = stack.enter_context(open(path, "rb"))
                        handles[path].seek(rows[0][local])
                        line = handles[path].readline()
                    except OSError as e:
                        raise DataError(
                            f"data file {path}: cannot read it: {one_line(e, with_type=True)}"
                        ) from None
                    batch.append((line, f"{path} line {rows[1][local]}"))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


class ArrowRows:
    """Rows of a `datasets.Dataset` (parquet files, Hub data sets)."""

    def __init__(self, ds: datasets.Dataset, name: str):
        self.ds, self.name = ds, name
        self.column_names = list(ds.column_names)

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, indices: np.ndarray, batch_size: int) -> Iterator[list[tuple[object, str]]]:
        offset = 0
        for batch in self.ds.select(indices).iter(batch_size=batch_size):
            columns = list(batch)
            count = len(batch[columns[0]]) if columns else 0
            yield [
                ({c: batch[c][j] for c in columns}, f"{self.name} row {indices[offset + j]}")
                for j in range(count)
            ]
            offset += count


def parse_row(row: object, where: str) -> object:
    """A row from its JSON line (a broken line names its file and line), or as read."""
    if not isinstance(row, bytes):
        return row
    try:
        return json.loads(row)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8: {e.reason} at byte {e.start}") from None


def local_files(source: str) -> list[str]:
    """The data files of a local source (a file, or every data file under a folder), sorted."""
    files = (
        sorted(glob.glob(os.path.join(source, "**", "*"), recursive=True))
        if os.path.isdir(source)
        else [source]
    )
    return [f for f in files if os.path.splitext(f)[1] in _FILE_KINDS]


def fingerprint(source: str) -> str:
    """Identifies a source's content, for the cache key and the checkpoint's record of its data: local
    files by a hash of their bytes (an edit that keeps the size and the modification time still shows),
    a Hub data set by the commit it resolves to."""
    if not os.path.exists(source):
        return hub_fingerprint(source)
    root = source if os.path.isdir(source) else os.path.dirname(source)
    digests = [(os.path.relpath(f, root), file_digest(f)) for f in local_files(source)]
    return "local:" + hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (~1 GB/s, streamed), computed once per process for a file unchanged since."""
    stat = os.stat(path)  # any write (even one that puts the mtime back) moves ctime, which no one can set
    return _digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


@functools.lru_cache(maxsize=1024)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.lru_cache(maxsize=64)
def hub_fingerprint(name: str) -> str:
    """`hub:<name>@<commit>`: the commit the Hub (or, offline, the local cache) resolves the data set
    to. Without either the name alone identifies it, and a warning says that a new commit would be read
    from the old cache."""
    repo_id = name.split(":")[0]
    try:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            folder = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
            return f"hub:{name}@{os.path.basename(folder)}"
        return f"hub:{name}@{huggingface_hub.HfApi().dataset_info(repo_id).sha}"
    except Exception as e:  # no network, no cache, no such repo: the load itself reports those
        log.warning(
            "data set %s: its commit cannot be resolved (%s); cached encodings are keyed by name",
            name,
            one_line(e),
        )
        return f"hub:{name}"


def _datasets():
    """`datasets`, imported only for parquet and Hub sources: JSON sources (and a process that reads
    none, like a GPU check) skip its second of import time. Outside the sources' try blocks, so a
    broken install is an ImportError, not a bad source."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def load_source(source: str) -> JsonRows | ArrowRows:
    """The rows of a source, not yet parsed."""
    if os.path.exists(source):
        files = local_files(source)
        if not files:
            raise DataError(f"data source {source}: no .jsonl, .json or .parquet files")
        kinds = {_FILE_KINDS[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise DataError(f"data source {source}: mixes json and parquet files")
        if kinds == {"json"}:
            return JsonRows(files)
        datasets = _datasets()
        try:
            return ArrowRows(datasets.load_dataset("parquet", data_files=files, split="train"), source)
        except Exception as e:
            raise DataError(f"data source {source}: cannot read it: {one_line(e, first_line=True)}") from None
    parts = source.split(":")
    if len(parts) > 3:
        raise DataError(f"data source {source}: expected name, name:split or name:config:split")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else ""
    datasets = _datasets()
    try:
        return ArrowRows(datasets.load_dataset(name, config, split=split or "train"), source)
    except Exception as e:
        raise DataError(f"data source {source}: not a local path, and the Hub load failed: {e}") from None


def draw(num_rows: int, amount: int | float, seed: int) -> np.ndarray:
    """Row indices for an amount: a float is a fraction (above 1.0 repeats the source), an int a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
        raise DataError(f"mixer amount {amount!r} must be a non-negative int (rows) or float (fraction)")
    wanted = int(round(amount * num_rows)) if isinstance(amount, float) else int(amount)
    rng = np.random.default_rng(seed)
    full, rest = divmod(wanted, num_rows) if num_rows else (0, 0)
    parts = [np.arange(num_rows)] * full + [np.sort(rng.choice(num_rows, rest, replace=False))]
    return np.concatenate(parts).astype(np.int64)


def is_ambiguous(amount: int | float, num_rows: int) -> bool:
    """An integer amount tiny against its source: probably 1 (or 2) meant as 1.0 (or 2.0)."""
    is_count = isinstance(amount, int) and not isinstance(amount, bool)
    return is_count and amount <= _AMBIGUOUS_COUNT and amount < _AMBIGUOUS_SHARE * num_rows


@dataclasses.dataclass
class Drawn:
    """One mixer entry, loaded: its rows, the indices drawn from them, and their format."""

    source: str
    rows: JsonRows | ArrowRows
    indices: np.ndarray
    format: RowFormat


def mix(mixer, seed: int) -> list[Drawn]:
    """Loads each entry, detects its format and picks its rows; the same seed gives the same rows.

    Every entry's format is checked before any row is drawn, so a wrong one fails early.
    """
    entries = [mixer_entry(e) for e in mixer]
    loaded = []
    for source, _, spec in entries:
        rows = load_source(source)
        loaded.append((rows, detect_format(source, rows.column_names, spec)))
    out = []
    for i, ((source, amount, _), (rows, row_format)) in enumerate(zip(entries, loaded, strict=True)):
        if is_ambiguous(amount, len(rows)):
            log.warning(
                "mixer amount %r for %s (%d rows) is a row count; write %.1f for a fraction",
                amount,
                source,
                len(rows),
                amount,
            )
        indices = draw(len(rows), amount, seed + i)
        log.info(
            "mixer: %s (%s) -> %d of %d rows (amount %r)",
            source,
            row_format.describe(),
            len(indices),
            len(rows),
            amount,
        )
        out.append(Drawn(source, rows, indices, row_format))
    return out
