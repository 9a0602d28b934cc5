"""Collect: forward hooks on the target layers -> sums of x and x xᵀ per distinct input.

Nothing but running sums is kept: C += XᵀX with one GEMM per layer input per batch, on
the model's device and without a host-device sync per batch. Layers that receive the same
input tensor in one forward pass (q/k/v, gate/up) share one statistic. Sums can be saved
to and loaded from safetensors.

Precision: the per-batch GEMM multiplies the layer's own activations (bf16/fp16 inputs go
through a GEMM with float32 output where the device has one) and accumulates in float32;
the running sums over batches are float32 on GPUs and float64 on the CPU by default
(`stats_dtype` picks either).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import CNTLoRAError
from .layers import LayerSpec, find_targets, input_rows, layer_spec, row_mask, weight_matrix
from .solver import Moments

FORMAT_VERSION = 1


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
        """Write a safetensors file atomically; refuses to replace existing statistics."""
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
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device="cpu") -> "Statistics":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise CNTLoRAError(f"no statistics file at {path}; create one with Statistics.save")
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "cntlora.statistics":
                raise CNTLoRAError(f"{path} is not a cntlora statistics file (no cntlora metadata)")
            raw = {k: f.get_tensor(k) for k in f.keys()}
        sets: Dict[str, Dict[str, Sums]] = {"fine": {}, "reference": {}}
        for key in raw:
            which, rest = key.split("/", 1)
            group = rest.rsplit("/", 1)[0]
            if group not in sets[which]:
                sets[which][group] = Sums.from_outer(*(raw[f"{which}/{group}/{k}"] for k in ("count", "total", "outer")))
        return cls(
            layers={k: LayerSpec.from_dict(v) for k, v in json.loads(meta["layers"]).items()},
            groups=json.loads(meta["groups"]),
            fine=sets["fine"],
            reference=sets["reference"] if meta.get("has_reference") == "True" else None,
            fingerprint=meta["fingerprint"],
            weight_digest=json.loads(meta["weight_digest"]),
            info=json.loads(meta.get("info", "{}")),
        )

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


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
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


def default_mask(batch) -> Optional[torch.Tensor]:
    """Positions to keep: attention_mask, minus labels == -100 where labels are per token."""
    if not isinstance(batch, dict) or batch.get("attention_mask") is None:
        return None
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


def default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# Inputs at least this wide keep only the upper block triangle of XᵀX (blocks of n/4 or n/2
# still keep the GEMMs large): up to 3/8 fewer FLOPs and bytes; Sums.full mirrors the rest.
BLOCKED_GRAM_FROM = 4096


def gram_blocks(n: int) -> List[tuple]:
    """Column ranges (start, stop) of the blocks XᵀX is computed in."""
    parts = 1 if n < BLOCKED_GRAM_FROM else (2 if n < 2 * BLOCKED_GRAM_FROM else 4)
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


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
        acc.add_(left.float() @ right.float())


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


class _StopForward(Exception):
    """Raised by the last needed hook to end a forward pass early; caught by _run_pass."""


class _Collector:
    """Forward pre-hooks that add each distinct layer input into its running sums."""

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        specs: Dict[str, LayerSpec],
        groups: Optional[Dict[str, str]],
        dtype: torch.dtype = torch.float64,
        stop_early: bool = False,
    ):
        self.modules, self.specs, self.dtype, self.stop_early = modules, specs, dtype, stop_early
        self.groups = dict(groups) if groups else {}
        self.discover = groups is None
        self.active: set = set()
        self.sums: Dict[str, Sums] = {}
        self.mask: Optional[torch.Tensor] = None
        self.seen: dict = {}
        self.fired: set = set()
        self.order: List[str] = []  # the targets in the order they first ran
        self.calls: Dict[str, int] = {}  # hook calls per target in the current batch
        self.stop_at: Optional[str] = None  # the last input this pass needs: stop the forward there

    def start_batch(self, mask: Optional[torch.Tensor]) -> None:
        self.mask = mask
        self.seen = {}
        self.calls = {}

    def hook(self, name: str):
        spec = self.specs[name]

        def pre_hook(module, args):
            if name not in self.fired:
                self.order.append(name)
                self.fired.add(name)
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:  # a layer run twice per forward (shared weights): never stop early
                self.stop_early, self.stop_at = False, None
            x = args[0]
            if self.discover:
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), spec.featurizer)
                hit = self.seen.get(key)
                if hit is not None and hit[0]() is x:
                    self.groups.setdefault(name, hit[1])
                else:
                    self.groups.setdefault(name, name)
                    self.seen[key] = (weakref.ref(x), self.groups[name])
            if self.groups.get(name) != name or name not in self.active:
                return
            rows = input_rows(x.detach(), spec)
            if not rows.is_floating_point():
                rows = rows.float()
            keep = row_mask(x, spec, self.mask)
            sums = self.sums.get(name)
            if sums is None:
                sums = self.sums[name] = Sums.zeros(spec.in_features, rows.device, self.dtype)
            if keep is None:
                sums.count += rows.shape[0]
            else:
                keep = keep.to(rows.dtype)
                rows = rows * keep.unsqueeze(1)  # a 0/1 weight: exact in any dtype
                sums.count += keep.sum(dtype=sums.count.dtype)
            sums.total += rows.sum(0, dtype=sums.total.dtype)
            add_gram(sums, rows)
            if name == self.stop_at:
                raise _StopForward

        return pre_hook

    def seen_every_target(self) -> None:
        """After a batch: once every target has run, the sharing is known and discovery ends."""
        if self.discover and len(self.fired) == len(self.modules):
            self.discover = False
            self.plan_stop()

    def plan_stop(self) -> None:
        """Stop each forward pass at the last layer input this pass collects (skipping, e.g., the
        LM head and, in a pass of a memory-capped collection, every layer after its group)."""
        needed = [n for n in self.order if self.groups.get(n) == n and n in self.active]
        self.stop_at = needed[-1] if (self.stop_early and not self.discover and needed) else None

    @contextmanager
    def attached(self):
        handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _model_device(model: nn.Module):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _run_pass(model, dataloader, collector, *, max_batches, max_tokens, forward_fn, mask_fn, device, desc, progress):
    batches = tokens = 0
    total = max_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    for batch in dataloader:
        if max_batches is not None and batches >= max_batches:
            break
        mask = _host_mask(mask_fn(batch))  # before the move: checking a host mask costs no device sync
        batch = to_device(batch, device)
        mask = mask_fn(batch) if mask is _ON_DEVICE else mask
        if mask is not None:
            mask = mask.to(device, non_blocking=True)
        collector.start_batch(mask)
        try:
            forward_fn(model, batch)
        except _StopForward:
            pass
        collector.seen_every_target()
        batches += 1
        bar.update(1)
        if max_tokens is not None:
            tokens += int(mask.sum()) if mask is not None else _batch_rows(batch)
            if tokens >= max_tokens:
                break
    bar.close()
    if batches == 0:
        raise CNTLoRAError(f"the {desc} dataloader yielded no batches; pass a dataloader with at least one batch")
    return batches, tokens


_ON_DEVICE = object()


def _host_mask(mask: Optional[torch.Tensor]):
    """None for a host mask that keeps every position (then no row is multiplied by it); a
    mask already on an accelerator is taken as it is (_ON_DEVICE), since reading it would sync."""
    if mask is None:
        return None
    if mask.device.type != "cpu":
        return _ON_DEVICE
    return None if bool(mask.all()) else mask


def _batch_rows(batch) -> int:
    first = batch
    while isinstance(first, (dict, list, tuple)):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    return int(first.shape[0] * (first.shape[1] if first.dim() > 1 else 1))


def _memory_passes(
    groups: Dict[str, str], specs: Dict[str, LayerSpec], cap: Optional[int], itemsize: int = 8
) -> List[List[str]]:
    """Split the distinct inputs into passes whose sums (itemsize bytes an entry) fit in `cap` bytes."""
    leaders = sorted(set(groups.values()), key=lambda g: list(specs).index(g))
    if cap is None:
        return [leaders]
    passes, current, used = [], [], 0
    for g in leaders:
        n = specs[g].in_features
        need = itemsize * (sum((a1 - a0) * (n - a0) for a0, a1 in gram_blocks(n)) + n + 1)
        if need > cap:
            raise CNTLoRAError(
                f"the statistics of {g!r} alone need {need} bytes, over max_stats_memory={cap}; raise the cap"
            )
        if current and used + need > cap:
            passes.append(current)
            current, used = [], 0
        current.append(g)
        used += need
    return passes + [current]


def _first_row(batch):
    """`batch` cut to its first example: every tensor whose first dimension is the batch's."""
    rows = None
    probe = batch
    while isinstance(probe, (dict, list, tuple)) and len(probe):
        probe = next(iter(probe.values())) if isinstance(probe, dict) else probe[0]
    if isinstance(probe, torch.Tensor) and probe.dim() > 0:
        rows = probe.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[:1] if rows is not None and v.dim() > 0 and v.shape[0] == rows else v
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)


def _discover(model: nn.Module, collector: "_Collector", batch, forward_fn: Callable, device) -> None:
    """One forward pass with the hooks attached and nothing collected: it records the order in
    which the targets run, which share an input and which run twice (then no early stop)."""
    active, collector.active = collector.active, set()
    try:
        collector.start_batch(None)
        with collector.attached():
            forward_fn(model, to_device(batch, device))
    finally:
        collector.active = active
    collector.seen_every_target()


def _finish_discovery(collector: "_Collector") -> None:
    if not collector.discover:
        return
    collector.discover = False
    silent = [n for n in collector.modules if n not in collector.groups]
    if silent:
        raise CNTLoRAError(f"layers {silent[:3]} never ran in the forward pass; remove them from target_modules")


def _all_reduce(sums: Dict[str, Sums]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for s in sums.values():
            for t in s.tensors():
                dist.all_reduce(t)


def collect_statistics(
    model: nn.Module,
    dataloader: Iterable,
    target_modules: Union[str, Sequence[str]],
    reference_dataloader: Optional[Iterable] = None,
    max_batches: Optional[int] = None,
    max_tokens: Optional[int] = None,
    forward_fn: Optional[Callable] = None,
    mask_fn: Optional[Callable] = None,
    max_stats_memory: Optional[int] = None,
    offload: bool = False,
    progress: bool = True,
    stats_dtype: Optional[torch.dtype] = None,
    stop_early: bool = True,
) -> Statistics:
    """Run the frozen model over the data and return the sums CNTLoRA solves from.

    forward_fn(model, batch) runs one batch (default: model(**batch) for dicts, model(x) for
    tensors and model(batch[0]) for tuples). mask_fn(batch) returns a (batch, seq) bool
    tensor of positions to keep (default: attention_mask, minus labels == -100).
    max_stats_memory (bytes) bounds the sums collected at once: the layers are split into
    groups and the data is passed once per group (iter_statistics). All groups' sums are
    returned together, so without offload they all end on the device; offload moves each
    group's sums to the CPU when its pass ends. To bound the device memory without host
    memory, let cntlora.initialize (or plan.solve_parts) solve each group as it arrives.
    stats_dtype: torch.float32 or torch.float64 running sums (default: float32 on GPUs,
    float64 on the CPU).
    stop_early: end each forward pass (by an exception from the hook, caught here) once the
    last layer input it collects has been seen, so the rest of the network (the LM head; the
    later layers in a pass of a memory-capped collection) never runs. Turn it off when
    forward_fn must run to the end (side effects, FSDP's post-forward resharding).
    """
    parts = iter_statistics(model, dataloader, target_modules, reference_dataloader=reference_dataloader,
                            max_batches=max_batches, max_tokens=max_tokens, forward_fn=forward_fn, mask_fn=mask_fn,
                            max_stats_memory=max_stats_memory, progress=progress, stats_dtype=stats_dtype,
                            stop_early=stop_early)
    merged = None
    for part in parts:
        if offload:
            part = part.to("cpu")
        if merged is None:
            merged = part
        else:
            merged.merge(part)
        del part
    merged.reorder(list(find_targets(model, target_modules)))  # the passes' layers in the model's order
    return merged


def iter_statistics(
    model: nn.Module,
    dataloader: Iterable,
    target_modules: Union[str, Sequence[str]],
    reference_dataloader: Optional[Iterable] = None,
    max_batches: Optional[int] = None,
    max_tokens: Optional[int] = None,
    forward_fn: Optional[Callable] = None,
    mask_fn: Optional[Callable] = None,
    max_stats_memory: Optional[int] = None,
    progress: bool = True,
    stats_dtype: Optional[torch.dtype] = None,
    stop_early: bool = True,
) -> Iterator[Statistics]:
    """collect_statistics one memory-capped pass at a time: yields a Statistics per group of
    layer inputs (one, holding every target, without max_stats_memory), on the model's device.

    The sums of a group exist only until the consumer lets go of the yielded object, so a
    consumer that solves each part and drops it holds one group's statistics at a time. Under
    torch.distributed every rank must iterate: each part is all-reduced when its pass ends.
    The arguments are collect_statistics'.
    """
    forward_fn = forward_fn or default_forward
    mask_fn = mask_fn or default_mask
    modules = find_targets(model, target_modules)
    specs = {name: layer_spec(name, m) for name, m in modules.items()}
    device = _model_device(model)
    dtype = stats_dtype_for(device, stats_dtype)
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
    progress = progress and rank0
    run = dict(max_batches=max_batches, max_tokens=max_tokens, forward_fn=forward_fn, mask_fn=mask_fn, device=device)

    sets = [("fine", dataloader)] + ([("reference", reference_dataloader)] if reference_dataloader is not None else [])
    collector = _Collector(modules, specs, None, dtype, stop_early)
    gemm = lambda: {str(k[1]).replace("torch.", ""): v for k, v in _GEMM_KIND.items() if k[0] == device.type}  # noqa: E731
    with _eval_mode(model):
        first = next(iter(dataloader), None)
        if first is None:
            raise CNTLoRAError("the fine dataloader yielded no batches; pass a dataloader with at least one batch")
        if iter(dataloader) is dataloader:  # a one-shot iterator: put the batch taken back in front
            dataloader = itertools.chain([first], dataloader)
            sets[0] = ("fine", dataloader)
        # The order and the sharing of the layer inputs, from one row of the first batch, so
        # that even the first batch stops early (the LM head's logits were a first-batch peak)
        try:
            _discover(model, collector, _first_row(first), forward_fn, device)
        except CNTLoRAError:
            raise
        except Exception:  # a forward that needs the whole batch (a fixed batch size): discover on it
            _discover(model, collector, first, forward_fn, device)
        passes: List[Optional[List[str]]] = [None]  # None: every layer (discovery may go on into the pass)
        if max_stats_memory is not None:  # every layer's sharing is needed to plan the passes
            if collector.discover:  # some layer did not run on that row (a mixture of experts?)
                _discover(model, collector, first, forward_fn, device)
            _finish_discovery(collector)
            passes = _memory_passes(collector.groups, specs, max_stats_memory, dtype.itemsize)
        del first
        for index, active in enumerate(passes):
            results: Dict[str, Dict[str, Sums]] = {}
            info = {}
            for which, loader in sets:
                if index > 0 and iter(loader) is loader:
                    raise CNTLoRAError(
                        "max_stats_memory needs several passes over the data; pass a re-iterable dataloader "
                        "(a list or a torch DataLoader), not a generator"
                    )
                collector.sums = {}
                collector.active = set(active or modules)
                collector.plan_stop()
                desc = which if len(passes) == 1 else f"{which} {index + 1}/{len(passes)}"
                with collector.attached():
                    batches, _ = _run_pass(model, loader, collector, desc=desc, progress=progress, **run)
                _finish_discovery(collector)
                results[which], collector.sums = collector.sums, {}
                info[which] = {"batches": batches, "passes": len(passes)}
                _all_reduce(results[which])
                _check_sums(which, results[which], collector.groups)
            info["stats_dtype"] = str(dtype).replace("torch.", "")
            info["gemm"] = gemm()
            leaders = set(results["fine"])
            layers = {n: spec for n, spec in specs.items() if collector.groups[n] in leaders}
            part = Statistics(
                layers=layers,
                groups={n: collector.groups[n] for n in layers},
                fine=results["fine"],
                reference=results.get("reference"),
                fingerprint=model_fingerprint(layers),
                weight_digest=weight_digest({n: modules[n] for n in layers}, layers),
                info=info,
            )
            del results
            yield part
            del part  # the consumer decides how long this pass's sums live


def _check_sums(which: str, sums: Dict[str, Sums], groups: Dict[str, str]) -> None:
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
                f"NaN or Inf in the {which} activations entering {sharing}; check the inputs and the model "
                "(fp16 overflow?), or mask those positions out with mask_fn"
            )
        if not any_row:
            raise CNTLoRAError(f"every position entering {g!r} was masked out; check attention_mask/labels")
