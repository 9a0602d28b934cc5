"""Small parsers shared by the command line and the benchmark."""

from __future__ import annotations

import argparse
import math

BYTE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def byte_size(text: str) -> int:
    """Parse a memory size such as '16GiB', '1.5GB', '512MiB' or a plain byte count.

    Args:
        text: the size, with an optional unit (KiB, MiB, GiB, KB, MB, GB, B; any case).

    Returns:
        The size in bytes, a positive int.

    Raises:
        argparse.ArgumentTypeError: not a finite positive size (so argparse reports it in one line).
    """
    low = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in BYTE_UNITS if low.endswith(u)), "")
    try:
        value = float(low[: len(low) - len(unit)]) * BYTE_UNITS.get(unit, 1)
        size = int(value) if math.isfinite(value) else 0
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write a positive size, e.g. 16GiB, 512MiB or 2GB")
    return size
