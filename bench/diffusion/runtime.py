"""Determinism switches, seeding, timing and the environment record shared by the scripts."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def make_deterministic(seed: int, fast_kernels: bool = False) -> None:
    """Seed every generator and, unless ``fast_kernels``, ask torch for deterministic kernels.

    Deterministic mode sets ``CUBLAS_WORKSPACE_CONFIG`` (before CUDA starts), turns off
    cuDNN autotuning and TF32, and calls ``torch.use_deterministic_algorithms(True,
    warn_only=True)``: an op with no deterministic CUDA kernel (e.g. cuDNN attention's
    backward) warns once instead of failing. On an H200 this mode made the denoiser's
    training step several times slower (cuDNN's deterministic bf16 convolutions), so
    ``fast_kernels`` keeps the seeds but lets cuDNN choose (and autotune) its fastest
    kernels; runs are then repeatable up to floating-point summation order.

    Args:
        seed: the seed for Python, NumPy and torch.
        fast_kernels: skip the deterministic-kernel switches.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    warnings.filterwarnings("once")
    if fast_kernels:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def environment() -> dict:
    """Versions and hardware, for the record.

    Returns:
        A JSON-ready dict.
    """
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "cuda": torch.version.cuda, "device": None}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    return env


def pick_device(name: str | None) -> torch.device:
    """The device to run on: the name given, else CUDA when present, else the CPU.

    Args:
        name: ``"cuda"``, ``"cpu"`` or None.

    Returns:
        A torch.device.
    """
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU).

    Args:
        device: the device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    """Monotonic seconds.

    Returns:
        ``time.perf_counter()``.
    """
    return time.perf_counter()


def write_json(path: str | Path, obj) -> None:
    """Write indented JSON, creating the folder.

    Args:
        path: the file.
        obj: a JSON-serialisable object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
