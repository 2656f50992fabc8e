"""One path API for what a run writes under `output_dir`: local folders and object stores alike.

`etils.epath` (the path library Orbax itself uses) gives `gs://`, `s3://` and local paths the same
calls. Object stores cannot append to a file, so a log is rewritten whole there; a folder "rename" is
whatever the store implements (on GCS a copy then a delete). Writers that only know local files
(safetensors) write into a local staging folder that is then copied up.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from jsft.errors import JsftError


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


def check_writable(folder: str | epath.Path, *, overwrite: bool = False) -> None:
    """`folder` is absent or an empty folder, or `overwrite` says its contents may be replaced."""
    target = epath.Path(folder)
    if target.exists() and not target.is_dir():
        raise JsftError(f"{folder} exists and is not a folder")
    existing = sorted(p.name for p in target.iterdir()) if target.exists() else []
    if existing and not overwrite:
        raise JsftError(
            f"{folder} is not empty ({len(existing)} entries, e.g. {existing[0]}); pass --overwrite to "
            "replace it, or choose another folder"
        )


@contextlib.contextmanager
def replacing(folder: str | epath.Path, *, overwrite: bool = False) -> Iterator[str]:
    """A local folder to write a whole result into; it becomes `folder` only when the block ends without
    an error, so a failure (a full disk, a crash) leaves whatever was at `folder` as it was.

    `folder` must be absent or empty unless `overwrite`: nothing a user has there is replaced without
    the flag. Locally the result is written beside `folder` and renamed into place (the old folder is
    removed only after the new one is there); on an object store it is copied up, then the files of the
    old folder that the new one does not have are removed."""
    check_writable(folder, overwrite=overwrite)
    target = epath.Path(folder)
    if is_remote(folder):
        written: list[str] = []
        with local_staging(folder) as staging:
            yield staging
            written = [str(p.relative_to(staging)) for p in pathlib.Path(staging).rglob("*") if p.is_file()]
        for stale in sorted(set(_files_under(target)) - set(written)):
            (target / stale).unlink()
        return
    local = pathlib.Path(folder).absolute()
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{local.name}.jsft-writing-", dir=local.parent))
    try:
        yield str(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folders are private; the result is an ordinary folder
    old = local.parent / f".{local.name}.jsft-replaced-{os.getpid()}" if local.exists() else None
    if old:
        local.rename(old)
    staging.rename(local)
    if old:
        shutil.rmtree(old)


def _files_under(folder: epath.Path) -> list[str]:
    """Paths of the files under `folder`, relative to it (walked with iterdir: stores lack rglob)."""
    files, pending = [], [folder] if folder.exists() else []
    while pending:
        for child in pending.pop().iterdir():
            if child.is_dir():
                pending.append(child)
            else:
                files.append(str(child.relative_to(folder)))
    return files
