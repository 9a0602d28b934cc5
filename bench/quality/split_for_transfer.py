"""Spread an export folder over sibling folders small enough to travel to the GPU machine one per call.

One device call carries at most 64 MiB, so a folder written by export_data.py with SmolLM2 in it
(~320 MiB) goes over in parts: each part is carried by its own call and copied into one folder
there. Files are not cut; each part holds whole files, at most --max-mib in all.

    python -m bench.quality.split_for_transfer .bench_data              # -> .bench_data_0, .bench_data_1, ...
    # on the device machine, one call per part (carry: [".bench_data_K"]):
    mkdir -p .bench_gpu && cp -r .bench_data_K/. .bench_gpu/
    # then check that every file arrived:
    python -m bench.quality.split_for_transfer --check .bench_gpu
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

MANIFEST = "transfer-manifest.json"  # every file of the whole folder and its size, in every part


def split(src: Path, max_bytes: int, prefix: str) -> list:
    files = {str(f.relative_to(src)): f.stat().st_size for f in sorted(src.rglob("*")) if f.is_file() and f.name != MANIFEST}
    too_big = [f"{name} ({size / 2**20:.1f} MiB)" for name, size in files.items() if size > max_bytes]
    if too_big:
        raise SystemExit(f"split_for_transfer: larger than one part: {', '.join(too_big)}; raise --max-mib or shard them")
    parts = []  # first fit, largest files first
    for name, size in sorted(files.items(), key=lambda kv: -kv[1]):
        part = next((p for p in parts if p["bytes"] + size <= max_bytes), None)
        if part is None:
            part = {"bytes": 0, "files": []}
            parts.append(part)
        part["bytes"] += size
        part["files"].append(name)
    # parts of an earlier split of this folder (they hold the manifest) go first, so none is left stale
    for old in src.parent.glob(f"{prefix}*"):
        if old.is_dir() and old.name[len(prefix):].isdigit() and (old / MANIFEST).exists():
            shutil.rmtree(old)
    folders = []
    for i, part in enumerate(parts):
        folder = src.parent / f"{prefix}{i}"
        for name in part["files"]:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, folder / name)
        (folder / MANIFEST).write_text(json.dumps(files, indent=1))
        folders.append((folder, part["bytes"]))
    return folders


def check(folder: Path) -> list:
    """Files of the manifest missing from `folder` or of another size (empty: all arrived)."""
    files = json.loads((folder / MANIFEST).read_text())
    return [name for name, size in files.items() if not (folder / name).is_file() or (folder / name).stat().st_size != size]


def main(argv=None) -> int:
    """Split the folder named on the command line, or --check an assembled one.

    Returns:
        0, or 1 when --check finds files missing.
    """
    p = argparse.ArgumentParser(prog="python -m bench.quality.split_for_transfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the export folder to split (or, with --check, the folder the parts were copied into)")
    p.add_argument("--max-mib", type=float, default=60, help="the most one part may hold (MiB)")
    p.add_argument("--prefix", default=None, help="part folder names: PREFIX0, PREFIX1, ... (default: FOLDER_)")
    p.add_argument("--check", action="store_true", help="check that a folder assembled from the parts is complete")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    if a.check:
        missing = check(folder)
        print(f"{folder}: " + (f"missing or incomplete: {', '.join(missing)}" if missing else "complete"))
        return 1 if missing else 0
    folders = split(folder, int(a.max_mib * 2**20), a.prefix or f"{folder.name}_")
    for part, size in folders:
        print(f"{part}  {size / 2**20:.1f} MiB")
    print(" ".join(str(part) for part, _ in folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
