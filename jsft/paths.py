"""One path API for what a run writes under `output_dir`: local folders and object stores alike.

`etils.epath` (the path library Orbax itself uses) gives `gs://`, `s3://` and local paths the same
calls. Object stores cannot append to a file, so a log is rewritten whole there; a folder "rename" is
whatever the store implements (on GCS a copy then a delete). Writers that only know local files
(safetensors) write into a local staging folder that is then copied up.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath


def is_remote(path: str | epath.Path) -> bool:
    return "://" in str(path)


def append_text(path: str | epath.Path, text: str) -> None:
    """Appends `text` to a file (created if absent); on an object store the file is rewritten."""
    path = epath.Path(path)
    if not is_remote(path):
        with path.open("a") as f:
            f.write(text)
        return
    path.write_text((path.read_text() if path.exists() else "") + text)


@contextlib.contextmanager
def local_staging(folder: str | epath.Path) -> Iterator[str]:
    """A local folder to write into: `folder` itself when local, else a temporary one whose files are
    copied to `folder` (replacing files of the same name) when the block ends without an error."""
    if not is_remote(folder):
        epath.Path(folder).mkdir(parents=True, exist_ok=True)
        yield str(folder)
        return
    staging = tempfile.mkdtemp(prefix="jsft-staging-")
    try:
        yield staging
        target = epath.Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        for local in sorted(pathlib.Path(staging).rglob("*")):
            if local.is_file():
                destination = target / str(local.relative_to(staging))
                destination.parent.mkdir(parents=True, exist_ok=True)
                with local.open("rb") as source, destination.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 64 * 2**20)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
