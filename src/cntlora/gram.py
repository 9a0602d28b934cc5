"""Adding XᵀX into running sums on any device: one GEMM per block row, checked once per dtype."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .config import CNTLoRAError
from .statistics import Sums


_GEMM_KIND: Dict[tuple, str] = {}


def _gemm_kind(rows: torch.Tensor, acc: torch.Tensor) -> str:
    """How to add rowsᵀ·rows into acc on this device, checked once per (device, dtypes).

    "fused": one addmm with float32 output written into the accumulator (CUDA, bf16/fp16);
    "mm_out": a float32-output GEMM, then an add; "upcast": float32 rows, then addmm.
    Each candidate is checked against the float32 result before it is trusted.
    """
    key = (rows.device.type, rows.dtype, acc.dtype)
    if key in _GEMM_KIND:
        return _GEMM_KIND[key]
    kind = "upcast"
    if rows.device.type == "cuda" and rows.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        gen = torch.Generator(device=rows.device).manual_seed(0)
        x = torch.randn(64, 48, device=rows.device, generator=gen).to(rows.dtype)
        want = x.float().T @ x.float() + 1.0  # onto a running sum that is not zero
        for candidate in ("fused", "mm_out"):
            try:
                trial = torch.ones(48, 48, device=rows.device)
                _add_product(candidate, trial, x.T, x)
                if torch.allclose(trial, want, rtol=1e-3, atol=1e-3):
                    kind = candidate
                    break
            except (RuntimeError, TypeError):
                continue
    _GEMM_KIND[key] = kind
    return kind


def _add_product(kind: str, acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    if kind == "fused":
        torch.addmm(acc, left, right, out_dtype=torch.float32, out=acc)
    elif kind == "mm_out":
        acc.add_(torch.mm(left, right, out_dtype=torch.float32))
    elif acc.dtype == torch.float32:
        acc.addmm_(left.float(), right.float())
    else:  # float64 running sums of float32 per-batch products
        product = left.float() @ right.float()
        if acc.device.type == "cpu" and not bool(torch.isfinite(product).all()):  # x² beyond float32: go wider
            product = left.double() @ right.double()
        acc.add_(product)


def add_gram(sums: Sums, rows: torch.Tensor) -> None:
    """sums.rows += the upper block rows of rowsᵀ·rows: one GEMM per block row."""
    kind = _gemm_kind(rows, sums.rows[0])
    for (a0, a1), acc in zip(sums.blocks(), sums.rows):
        _add_product(kind, acc, rows[:, a0:a1].T, rows[:, a0:])


def stats_dtype_for(device: torch.device, stats_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The running sums' dtype: float32 on GPUs (fast GEMM accumulation), float64 on the CPU."""
    if stats_dtype is None:
        return torch.float32 if device.type == "cuda" else torch.float64
    if stats_dtype not in (torch.float32, torch.float64):
        raise CNTLoRAError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype}")
    return stats_dtype
