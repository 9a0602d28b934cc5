"""Statistics: the running sums of x and x xᵀ per distinct layer input, and their file format.

Nothing but running sums is kept: C += XᵀX with one GEMM per layer input per batch, on the
model's device. Layers that receive the same input tensor in one forward pass (q/k/v,
gate/up) share one statistic. cntlora.collect fills them; Statistics.save and
Statistics.load write and read them as safetensors.

Precision: the per-batch GEMM multiplies the layer's own activations (bf16/fp16 inputs go
through a GEMM with float32 output where the device has one) and accumulates in float32;
the running sums over batches are float32 on GPUs and float64 on the CPU by default
(`stats_dtype` picks either).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .config import CNTLoRAError
from .files import atomic_write
from .layers import LayerSpec, layer_spec, weight_matrix
from .solver import Moments

FORMAT_VERSION = 2  # 2 adds a content checksum
READABLE_VERSIONS = ("1", "2")


@dataclass
class Sums:
    """Running sums over the rows x of one distinct layer input.

    Σ x xᵀ is symmetric, so only its upper block triangle is kept, as block rows:
    rows[i] = (Σ x xᵀ)[e_i:e_i+1, e_i:] for the block edges e of gram_blocks(n). Inputs
    narrower than BLOCKED_GRAM_FROM have one block row (the whole matrix); wider ones hold
    5/8 of it (4 blocks), which is what lets the statistics of a model fit beside it.
    """

    count: torch.Tensor  # scalar
    total: torch.Tensor  # n
    rows: List[torch.Tensor]  # the block rows of the upper block triangle of Σ x xᵀ

    @classmethod
    def zeros(cls, n: int, device, dtype=torch.float64) -> "Sums":
        rows = [torch.zeros(a1 - a0, n - a0, dtype=dtype, device=device) for a0, a1 in gram_blocks(n)]
        # the count stays float64: float32 stops counting exactly at 2**24 rows
        return cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros(n, dtype=dtype, device=device), rows)

    @classmethod
    def from_outer(cls, count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> "Sums":
        return cls(count, total, [outer[a0:a1, a0:].clone() for a0, a1 in gram_blocks(outer.shape[0])])

    @staticmethod
    def nbytes_for(n: int, itemsize: int) -> int:
        """Bytes of the sums of an n-wide input with `itemsize`-byte entries."""
        return itemsize * (sum((a1 - a0) * (n - a0) for a0, a1 in gram_blocks(n)) + n + 1)

    @property
    def outer(self) -> torch.Tensor:
        """Σ x xᵀ as a full n × n matrix, in the accumulator's dtype and place."""
        return self.full(self.rows[0].dtype)

    def blocks(self) -> List[tuple]:
        """The (start, stop) of each block row, read off the rows' shapes."""
        n = self.total.numel()
        return [(n - r.shape[1], n - r.shape[1] + r.shape[0]) for r in self.rows]

    def full(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """Σ x xᵀ as a full n × n matrix of `dtype` on `device` (moved before the conversion)."""
        n = self.total.numel()
        device = self.rows[0].device if device is None else device
        out = torch.empty(n, n, dtype=dtype, device=device)
        for (a0, a1), row in zip(self.blocks(), self.rows):
            out[a0:a1, a0:] = row.to(device, non_blocking=True)
            out[a1:, a0:a1] = out[a0:a1, a1:].T
            # a GEMM's XᵀX is symmetric only to rounding: mirror the upper triangle, so every
            # solve sees one exactly symmetric matrix (Cholesky reads the lower half, GEMMs all of it)
            diagonal = out[a0:a1, a0:a1]
            diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        return out

    def to(self, device) -> "Sums":
        return Sums(self.count.to(device), self.total.to(device), [r.to(device) for r in self.rows])

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor of the sums (for reductions and byte counts)."""
        return [self.count, self.total, *self.rows]

    def moments(self, device=None) -> Moments:
        """Float64 moments (what the solve needs, whatever the accumulator was), on `device`
        (default: where the sums are); moved before the conversion, so offloaded sums are
        converted on the GPU."""
        n = float(self.count)
        if n <= 0:
            raise CNTLoRAError("no rows were collected for a layer (every position was masked out?)")
        device = self.total.device if device is None else device
        return Moments(n, self.total.to(device).double() / n, self.full(torch.float64, device).div_(n))


@dataclass
class Statistics:
    """Activation sums of the target layers of one model, for the fine-tuning data and
    (optionally) a reference set of pre-training-like data."""

    layers: Dict[str, LayerSpec]
    groups: Dict[str, str]  # layer name -> name of the layer whose input statistic it shares
    fine: Dict[str, Sums]
    reference: Optional[Dict[str, Sums]]
    fingerprint: str
    weight_digest: Dict[str, str]
    info: dict

    def moments(self, layer: str, which: str = "fine", device=None) -> Moments:
        sums = self.fine if which == "fine" else self.reference
        if sums is None:
            raise CNTLoRAError("these statistics have no reference set; pass reference_dataloader= when collecting")
        return sums[self.groups[layer]].moments(device)

    def to(self, device) -> "Statistics":
        """The same statistics with every sum on `device`."""
        move = lambda sets: None if sets is None else {g: s.to(device) for g, s in sets.items()}  # noqa: E731
        return Statistics(self.layers, self.groups, move(self.fine), move(self.reference), self.fingerprint,
                          self.weight_digest, self.info)

    def merge(self, other: "Statistics") -> None:
        """Add the layers of another pass over the same model and data (iter_statistics' parts)."""
        if set(other.layers) & set(self.layers):
            raise CNTLoRAError("these statistics already hold some of those layers; merge only disjoint passes")
        if (self.reference is None) != (other.reference is None):
            raise CNTLoRAError("one set of statistics has a reference set and the other has none; collect both alike")
        self.layers = {**self.layers, **other.layers}
        self.groups.update(other.groups)
        self.fine.update(other.fine)
        if self.reference is not None:
            self.reference.update(other.reference)
        self.weight_digest.update(other.weight_digest)
        self.fingerprint = model_fingerprint(self.layers)

    def reorder(self, names: List[str]) -> None:
        """List the layers (and their groups and digests) in the order of `names`."""
        self.layers = {n: self.layers[n] for n in names if n in self.layers}
        self.groups = {n: self.groups[n] for n in self.layers}
        self.weight_digest = {n: self.weight_digest[n] for n in self.layers}

    def nbytes(self) -> int:
        sets = [self.fine] + ([self.reference] if self.reference else [])
        return sum(t.numel() * t.element_size() for s in sets for v in s.values() for t in v.tensors())

    def save(self, path: Union[str, os.PathLike], overwrite: bool = False) -> None:
        """Write the statistics to a safetensors file, atomically, with a content checksum.

        Args:
            path: the file to write.
            overwrite: replace an existing file (by default statistics never overwrite statistics).

        Raises:
            CNTLoRAError: the file exists and overwrite is False.
        """
        from safetensors.torch import save_file

        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise CNTLoRAError(f"{path} already exists; statistics never overwrite statistics. "
                               "Pick another path or pass overwrite=True")
        tensors = {}
        for which, sets in (("fine", self.fine), ("reference", self.reference or {})):
            for group, sums in sets.items():  # the full matrix on disk: the format stays plain
                plain = {"count": sums.count, "total": sums.total, "outer": sums.full(torch.float64, "cpu")}
                for key, t in plain.items():
                    tensors[f"{which}/{group}/{key}"] = t.detach().to("cpu", torch.float64).contiguous()
        meta = {
            "format": "cntlora.statistics",
            "version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "layers": json.dumps({k: v.to_dict() for k, v in self.layers.items()}),
            "groups": json.dumps(self.groups),
            "weight_digest": json.dumps(self.weight_digest),
            "has_reference": str(self.reference is not None),
            "info": json.dumps(self.info),
        }
        meta["checksum"] = _checksum(tensors, meta)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device="cpu") -> "Statistics":
        """Read statistics written by `save`, after checking they are whole and plausible.

        Args:
            path: the safetensors file.
            device: where the sums go.

        Returns:
            The Statistics.

        Raises:
            CNTLoRAError: no such file, not a statistics file, damaged (a checksum mismatch,
                missing or malformed entries), an unknown format version, or implausible sums
                (counts not positive, values not finite, a Gram matrix not symmetric).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CNTLoRAError(f"no statistics file at {path}; create one with Statistics.save")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "cntlora.statistics":
                    raise CNTLoRAError(f"{path} is not a cntlora statistics file (no cntlora metadata)")
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except CNTLoRAError:
            raise
        except Exception as e:  # safetensors' own errors for truncated or corrupted files
            raise CNTLoRAError(f"{path} is damaged or not a safetensors file ({type(e).__name__}: "
                               f"{str(e)[:200]}); collect the statistics again") from e
        try:
            stats = cls._from_file(meta, raw)
        except CNTLoRAError as e:
            raise CNTLoRAError(f"{path}: {e}") from None
        except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, IndexError) as e:
            raise CNTLoRAError(f"{path} is damaged ({type(e).__name__}: {str(e)[:200]}); "
                               "collect the statistics again") from e
        return stats.to(device)

    @classmethod
    def _from_file(cls, meta: Dict[str, str], raw: Dict[str, torch.Tensor]) -> "Statistics":
        version = meta.get("version")
        if version not in READABLE_VERSIONS:
            raise CNTLoRAError(f"format version {version!r} is unknown; this cntlora reads {READABLE_VERSIONS}")
        if version != "1" and meta.get("checksum") != _checksum(raw, meta):
            raise CNTLoRAError("the content does not match its checksum (damaged or edited); collect the statistics again")
        layers = {k: LayerSpec.from_dict(v) for k, v in json.loads(meta["layers"]).items()}
        groups = json.loads(meta["groups"])
        has_reference = meta["has_reference"] == "True"
        sets: Dict[str, Dict[str, Sums]] = {"fine": {}, "reference": {}}
        for key in raw:
            which, group, field = key.split("/")
            if which not in sets or field not in ("count", "total", "outer"):
                raise CNTLoRAError(f"unexpected entry {key!r}")
            if group not in sets[which]:
                sets[which][group] = _checked_sums(group, *(raw[f"{which}/{group}/{k}"] for k in ("count", "total", "outer")))
        if set(groups) != set(layers):
            raise CNTLoRAError("the layers and their groups do not match")
        for which in ("fine", "reference") if has_reference else ("fine",):
            for name, group in groups.items():
                sums = sets[which].get(group)
                if sums is None or sums.total.numel() != layers[group].in_features:
                    raise CNTLoRAError(f"the {which} sums of {name!r} are missing or of the wrong size")
        return cls(layers=layers, groups=groups, fine=sets["fine"], reference=sets["reference"] if has_reference else None,
                   fingerprint=str(meta["fingerprint"]), weight_digest=dict(json.loads(meta["weight_digest"])),
                   info=json.loads(meta.get("info", "{}")))

    def check_model(self, model: nn.Module) -> Dict[str, nn.Module]:
        """The target modules of `model`, after checking these statistics belong to it."""
        modules = dict(model.named_modules())
        found = {}
        for name in self.layers:
            module = modules.get(name) or modules.get(f"base_model.model.{name}")
            if module is None:
                raise CNTLoRAError(
                    f"the statistics are for layer {name!r}, which this model lacks: they were collected "
                    "on another model. Collect statistics on this model"
                )
            found[name] = module
        specs = {name: layer_spec(name, m) for name, m in found.items()}
        if model_fingerprint(specs) != self.fingerprint:
            raise CNTLoRAError(
                "the statistics were collected on a model with other layer shapes; collect statistics on this model"
            )
        digest = weight_digest(found, specs)
        changed = [n for n in digest if digest[n] != self.weight_digest.get(n)]
        if changed:
            raise CNTLoRAError(
                f"the weights of {changed[:3]} differ from the model the statistics were collected on "
                "(another checkpoint, or already modified by a residual init?); collect statistics on this model"
            )
        return found


def model_fingerprint(specs: Dict[str, LayerSpec]) -> str:
    blob = json.dumps({k: specs[k].to_dict() for k in sorted(specs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weight_digest(modules: Dict[str, nn.Module], specs: Dict[str, LayerSpec]) -> Dict[str, str]:
    """A cheap per-layer checksum of W0, to catch statistics from another checkpoint."""
    out = {}
    for name, module in modules.items():
        w = weight_matrix(module, specs[name]).detach().double()
        out[name] = f"{float(w.sum()):.6e}/{float(w.pow(2).sum()):.6e}"
    return out


# Inputs at least this wide keep only the upper block triangle of XᵀX (blocks of n/4 or n/2
# still keep the GEMMs large): up to 3/8 fewer FLOPs and bytes; Sums.full mirrors the rest.
BLOCKED_GRAM_FROM = 4096


def gram_blocks(n: int) -> List[tuple]:
    """Column ranges (start, stop) of the blocks XᵀX is computed in."""
    parts = 1 if n < BLOCKED_GRAM_FROM else (2 if n < 2 * BLOCKED_GRAM_FROM else 4)
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def check_sums(which: str, sums: Dict[str, Sums], groups: Dict[str, str]) -> None:
    """Every sum finite (checked where it lives, one device sync) and every input seen."""
    if not sums:
        return
    finite = [torch.stack([torch.isfinite(t).all() for t in s.tensors()]).all() for s in sums.values()]
    seen = [s.count > 0 for s in sums.values()]
    finite, seen = torch.stack([torch.stack(finite), torch.stack(seen)]).cpu().tolist()
    for g, ok, any_row in zip(sums, finite, seen):
        if not ok:
            sharing = [n for n, lead in groups.items() if lead == g]
            raise CNTLoRAError(
                f"NaN or Inf in the sums of the {which} activations entering {sharing}: the activations are not "
                "finite, or their squares overflow float32 (|x| above ~1e19). Check the inputs and the model (fp16 "
                "overflow?), pass stats_dtype=torch.float64, or mask those positions out with mask_fn"
            )
        if not any_row:
            raise CNTLoRAError(f"every position entering {g!r} was masked out; check attention_mask/labels")


def _checksum(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> str:
    """sha256 over the metadata (but the checksum) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _checked_sums(group: str, count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> Sums:
    """Sums read from a file, refused unless they could have come from real data."""
    n = total.numel()
    if count.numel() != 1 or total.dim() != 1 or tuple(outer.shape) != (n, n):
        raise CNTLoRAError(f"the sums of {group!r} have inconsistent shapes")
    if not all(bool(torch.isfinite(t).all()) for t in (count, total, outer)):
        raise CNTLoRAError(f"the sums of {group!r} hold NaN or Inf")
    if not float(count) > 0:
        raise CNTLoRAError(f"the sums of {group!r} count {float(count)} rows; a count must be positive")
    scale = float(outer.abs().max()) or 1.0
    if float((outer - outer.T).abs().max()) > 1e-6 * scale or bool((outer.diagonal() < 0).any()):
        raise CNTLoRAError(f"the Gram matrix of {group!r} is not symmetric positive semi-definite")
    return Sums.from_outer(count.double(), total, outer)
