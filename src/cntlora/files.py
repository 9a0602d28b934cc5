"""Writing files safely: a write either completes or leaves the previous file in place.

Every file cntlora writes goes through `atomic_write` (one file) or
`write_directory_atomically` (a folder); `write_json` is the JSON writer on top. Neither ever
deletes a file cntlora did not write. A write killed part-way leaves hidden debris next to
its target; the next write to the same target recovers or removes it and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from typing import Callable, Iterable, Optional

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
    _remove_debris([os.path.join(folder, f) for f in os.listdir(folder)
                    if f.startswith(".tmp-") and f.endswith(os.path.basename(path))], path)
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


JOURNAL = ".cntlora-swap.json"  # inside a folder while its files are being swapped


def _remove_debris(paths, target: str) -> None:
    """Delete what killed writes to `target` left behind, and say so."""
    for p in paths:
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    if paths:
        warnings.warn(f"removed {len(paths)} leftover temporary file(s) of an interrupted write to {target}",
                      stacklevel=3)


def _swap_in(out_dir: str, staging: str, files: Iterable[str], stale: Iterable[str], backup: str) -> None:
    """Move the staged files into out_dir and drop the stale ones; idempotent (a retry finishes it)."""
    for f in files:
        if os.path.lexists(os.path.join(staging, f)):
            os.replace(os.path.join(staging, f), os.path.join(out_dir, f))
    for f in stale:
        if os.path.lexists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    os.remove(os.path.join(out_dir, JOURNAL))
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(backup, ignore_errors=True)


def recover_directory(out_dir: str) -> bool:
    """Finish or undo an interrupted `write_directory_atomically` to out_dir, and remove its debris.

    A swap that was killed part-way is finished from its complete staging folder (its journal
    says which files). Staging folders of writes killed before the swap are deleted. Nothing
    else in out_dir is touched.

    Args:
        out_dir: the folder that was being written.

    Returns:
        True if anything was recovered or removed (a warning says what).

    Raises:
        CNTLoRAError: the journal is unreadable; the message names the folders to inspect.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, leaf = os.path.split(out_dir)
    if not os.path.isdir(parent):
        return False
    journal, done = os.path.join(out_dir, JOURNAL), False
    if os.path.isfile(journal):
        try:
            with open(journal) as f:
                j = json.load(f)
            staging, backup = os.path.join(parent, j["staging"]), os.path.join(parent, j["backup"])
            _swap_in(out_dir, staging, j["files"], j["stale"], backup)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CNTLoRAError(f"{out_dir} holds an interrupted save ({JOURNAL}) that could not be finished ({e}); "
                               f"inspect the hidden .{leaf}.* folders next to it") from e
        warnings.warn(f"finished an interrupted save into {out_dir}", stacklevel=2)
        done = True
    debris = [os.path.join(parent, f) for f in os.listdir(parent)
              if f.startswith((f".{leaf}.tmp-", f".{leaf}.bak-", f".{leaf}.old-"))]
    old = sorted(p for p in debris if os.path.basename(p).startswith(f".{leaf}.old-"))
    if old and not os.path.lexists(out_dir):  # a folder set aside by a replace that was killed: put it back
        os.replace(old[0], out_dir)
        warnings.warn(f"restored {out_dir} from an interrupted replace", stacklevel=2)
        debris.remove(old[0])
        done = True
    _remove_debris(debris, out_dir)
    return done or bool(debris)


def write_directory_atomically(out_dir: str, write: Callable[[str], None], marker: Optional[str] = None,
                               kind: str = "a folder cntlora wrote", owned: Iterable[str] = (),
                               overwrite: bool = False, keep_existing: Iterable[str] = ("README.md",)) -> None:
    """Fill a fresh folder next to `out_dir` with write(folder), then move its files into place.

    A new (or empty) out_dir is one rename. An existing folder gets the new files one rename
    each, after a journal is written; a kill part-way is finished by the next call (see
    recover_directory). A write that fails leaves the previous files as they were. Files that
    cntlora did not write are never deleted or replaced.

    Args:
        out_dir: the folder to create or update.
        write: called with the staging folder's path; it must write every file there.
        marker: a file name that marks a folder as `kind`. A non-empty out_dir without it is refused.
        kind: what such a folder is, for the error messages.
        owned: the names of files cntlora writes into such folders; those the new write does
            not produce are removed (e.g. a residual base from an earlier save).
        overwrite: allow updating an existing non-empty folder.
        keep_existing: staged files that never replace a file of that name already in out_dir.

    Raises:
        CNTLoRAError: out_dir is a file, a non-empty folder that is not `kind`, or an existing
            folder without overwrite=True.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isfile(out_dir):
        raise CNTLoRAError(f"{out_dir} is a file; pass a folder path")
    recover_directory(out_dir)
    existing = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    if existing and not (marker and os.path.isfile(os.path.join(out_dir, marker))):
        what = f" (no {marker})" if marker else ""
        raise CNTLoRAError(f"{out_dir} exists and is not {kind}{what}; pick a new folder or empty it")
    if existing and not overwrite:
        raise CNTLoRAError(f"{out_dir} already holds {kind}; pass overwrite=True (CLI: --overwrite) to replace "
                           "cntlora's files in it (other files stay), or pick a new folder")
    parent, leaf = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    # os.mkdir (unlike mkdtemp) honours the umask, so the final folder gets normal permissions.
    token = uuid.uuid4().hex[:12]
    staging, backup = os.path.join(parent, f".{leaf}.tmp-{token}"), os.path.join(parent, f".{leaf}.bak-{token}")
    os.mkdir(staging)
    try:
        write(staging)
        if not existing:
            os.replace(staging, out_dir)  # onto nothing, or onto an empty folder
            return
        files = [f for f in sorted(os.listdir(staging))
                 if not (f in set(keep_existing) and os.path.lexists(os.path.join(out_dir, f)))]
        stale = [f for f in owned if f not in files and os.path.isfile(os.path.join(out_dir, f))]
        os.mkdir(backup)
        for f in files + stale:  # the previous files, kept until the swap is done (restored if it fails)
            if os.path.isfile(os.path.join(out_dir, f)):
                shutil.copy2(os.path.join(out_dir, f), os.path.join(backup, f))
        write_json(os.path.join(out_dir, JOURNAL), {"staging": os.path.basename(staging), "files": files,
                                                    "stale": stale, "backup": os.path.basename(backup)})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    try:
        _swap_in(out_dir, staging, files, stale, backup)
    except BaseException:
        for f in files:  # put the previous files back; drop new ones that had no predecessor
            previous = os.path.join(backup, f)
            if os.path.isfile(previous):
                os.replace(previous, os.path.join(out_dir, f))
            elif os.path.lexists(os.path.join(out_dir, f)) and not os.path.lexists(os.path.join(staging, f)):
                os.remove(os.path.join(out_dir, f))
        for f in stale:
            if os.path.isfile(os.path.join(backup, f)):
                os.replace(os.path.join(backup, f), os.path.join(out_dir, f))
        if os.path.lexists(os.path.join(out_dir, JOURNAL)):
            os.remove(os.path.join(out_dir, JOURNAL))
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
        raise
