"""Writing files safely: a write either completes or leaves the previous file in place.

Every file cntlora writes goes through `atomic_write` (one file) or
`write_directory_atomically` (a whole folder); `write_json` is the JSON writer on top.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Callable, Optional

from .config import CNTLoRAError


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write a file through a temporary file in the same folder, then rename it over `path`.

    Args:
        path: the file to write; its folder is created if missing.
        write: called with the temporary file's path; it must write the whole content there.

    Raises:
        Whatever `write` raises; `path` is then untouched and the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data, indent: Optional[int] = 2, allow_nan: bool = True) -> None:
    """Write `data` as JSON (with a final newline) through `atomic_write`.

    Args:
        path: the file to write.
        data: anything `json.dumps` takes.
        indent: passed to `json.dumps`.
        allow_nan: False refuses NaN and infinities instead of writing non-standard JSON.

    Raises:
        ValueError: a NaN or infinity with allow_nan=False; nothing is written then.
    """
    text = json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_directory_atomically(out_dir: str, write: Callable[[str], None], marker: Optional[str] = None,
                               kind: str = "a folder cntlora wrote") -> None:
    """Fill a fresh folder next to `out_dir` with write(folder), then swap it into place.

    An existing `out_dir` is renamed aside first and deleted only once the new folder is in
    place, so a failed write never leaves a broken folder where a good one was.

    Args:
        out_dir: the folder to create or replace.
        write: called with the staging folder's path; it must write every file there.
        marker: a file name that marks a folder as ours. A non-empty `out_dir` without it is
            never replaced. None replaces only an empty folder.
        kind: what such a folder is, for the error message.

    Raises:
        CNTLoRAError: `out_dir` is a file, or a non-empty folder cntlora did not write.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isfile(out_dir):
        raise CNTLoRAError(f"{out_dir} is a file; pass a folder path")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not (marker and os.path.isfile(os.path.join(out_dir, marker))):
        what = f" (no {marker})" if marker else ""
        raise CNTLoRAError(f"{out_dir} exists and is not {kind}{what}; pick a new folder or empty it")
    parent, leaf = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    # os.mkdir (unlike mkdtemp) honours the umask, so the final folder gets normal permissions.
    staging = os.path.join(parent, f".{leaf}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    aside = None
    if os.path.lexists(out_dir):
        aside = os.path.join(parent, f".{leaf}.old-{uuid.uuid4().hex[:12]}")
        os.replace(out_dir, aside)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if aside is not None:
            os.replace(aside, out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
