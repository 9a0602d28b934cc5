"""Collect: forward hooks on the target layers -> Statistics.

Hooks add each distinct layer input into its running sums (cntlora.statistics.Sums). A pass
runs the frozen model over the data; `max_stats_memory` splits the layers into groups and
passes the data once per group. Under torch.distributed the sums are all-reduced.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import (_ON_DEVICE, _forward, _StopForward, _batch_rows, _first_row, _host_mask, check_caps, default_forward, default_mask,
                      eval_mode, length_of, model_device, to_device)
from . import distributed as dist
from .config import CNTLoRAError
from .layers import LayerSpec, base_layer, find_targets, input_rows, layer_spec, row_mask
from .gram import _GEMM_KIND, add_gram, stats_dtype_for
from .statistics import Statistics, Sums, check_sums, model_fingerprint, weight_digest


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


# batches read from an iterable without a length when neither max_batches nor max_tokens is set
STREAM_CAP = 10_000


def _run_pass(model, dataloader, collector, *, max_batches, max_tokens, forward_fn, mask_fn, device, desc, progress):
    batches = tokens = 0
    length = length_of(dataloader)
    stream_cap = length is None and max_batches is None and max_tokens is None
    if stream_cap:
        max_batches = STREAM_CAP
    total = max_batches if length is None else min(length, max_batches or length)
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
            _forward(forward_fn, model, batch, f"{desc} batch {batches + 1}")
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
    if stream_cap and batches >= STREAM_CAP:
        warnings.warn(f"the {desc} data has no length and was read up to {STREAM_CAP} batches; pass max_batches= "
                      "or max_tokens= to read more or fewer", stacklevel=2)
    if batches == 0 and not dist.active():  # under torch.distributed a rank may have none; some rank must
        raise CNTLoRAError(f"the {desc} dataloader yielded no batches; pass a dataloader with at least one batch")
    return batches, tokens


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
        need = Sums.nbytes_for(n, itemsize)
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


def _discover(model: nn.Module, collector: "_Collector", batch, forward_fn: Callable, device,
              what: Optional[str] = None) -> None:
    """One forward pass with the hooks attached and nothing collected: it records the order in
    which the targets run, which share an input and which run twice (then no early stop)."""
    active, collector.active = collector.active, set()
    try:
        collector.start_batch(None)
        with collector.attached():
            _forward(forward_fn, model, to_device(batch, device), what)
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


def _check_ranks(table: list, sharded: bool) -> None:
    """After the first batch: some rank has data, all or none have a reference set, and under
    FSDP2 every rank has as many batches as the others."""
    if not any(row[0] for row in table):
        raise CNTLoRAError("the fine dataloader yielded no batches; pass a dataloader with at least one batch")
    if len({row[1] for row in table}) > 1:
        raise CNTLoRAError("some ranks passed reference_dataloader and some did not; pass it on every rank or none")
    if sharded:
        dist.check_sharded_lengths(table, 2, "fine")


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

    Args:
        model: the model (it runs in eval mode without gradients; its modes are restored).
        dataloader: an iterable of batches: dicts (passed as model(**batch)), tensors or tuples.
            An iterable without a length (a generator, a stream) stops after STREAM_CAP batches
            unless max_batches or max_tokens is given, with a warning.
        target_modules: layer names, name suffixes, or one regex (matched in full).
        reference_dataloader: pre-training-like batches, for Cross and Shift's pretrain_source="reference".
        max_batches: stop after this many batches of each set (a positive int or None).
        max_tokens: stop once this many positions (kept by the mask) were seen (a positive int or None).
        forward_fn: forward_fn(model, batch) runs one batch (default: model(**batch) for dicts,
            model(x) for tensors, model(batch[0]) for tuples).
        mask_fn: mask_fn(batch) -> a (batch, seq) bool tensor of positions to keep (default:
            attention_mask, minus labels == -100).
        max_stats_memory: bytes of sums collected at once: the layers are split into groups and
            the data is passed once per group (cntlora.initialize solves each as it arrives).
        offload: move each group's sums to the CPU when its pass ends.
        progress: show progress bars (rank 0 only under torch.distributed).
        stats_dtype: torch.float32 or torch.float64 running sums (default: float32 on GPUs,
            float64 on the CPU).
        stop_early: end each forward pass once the last layer input it collects has been seen,
            so the rest of the network (the LM head, later layers) never runs. Turn it off when
            forward_fn must run to the end (side effects, FSDP's post-forward resharding).

    Returns:
        Statistics over the fine-tuning data (and the reference set), all-reduced under
        torch.distributed, with the layers in the model's order.

    Raises:
        CNTLoRAError: no target matches, a dataloader yields no batch, a target never runs,
            the activations are not finite, every position is masked out, or a cap is invalid.
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
    merged.reorder(list(find_targets(dist.unwrap(model), target_modules)))  # the passes' layers in the model's order
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
    """collect_statistics one memory-capped pass at a time.

    The sums of a group exist only until the consumer lets go of the yielded object, so a
    consumer that solves each part and drops it holds one group's statistics at a time. Under
    torch.distributed every rank must iterate: each part is all-reduced when its pass ends.

    Args:
        The arguments of collect_statistics (without offload).

    Returns:
        An iterator of Statistics, one per group of layer inputs (a single one holding every
        target without max_stats_memory), on the model's device.

    Raises:
        CNTLoRAError: as collect_statistics; also a one-shot iterator with several passes.
    """
    check_caps(max_batches, max_tokens, max_stats_memory)
    model = dist.unwrap(model)  # DDP: hooks, names and forward on the module itself
    if any(p.is_meta for p in model.parameters()):
        raise CNTLoRAError("the model is on the meta device (no weights are loaded); load it with its weights, "
                           "e.g. from_pretrained without init_empty_weights, before initializing")
    forward_fn = forward_fn or default_forward
    mask_fn = mask_fn or default_mask
    modules = find_targets(model, target_modules)
    specs = {name: layer_spec(name, m) for name, m in modules.items()}
    device = model_device(model)
    dtype = stats_dtype_for(device, stats_dtype)
    progress = progress and dist.is_main()
    sharded = any(dist.is_sharded(m.weight) for m in map(base_layer, modules.values()))
    stop_early = stop_early and not sharded  # FSDP2: every forward runs to the end, resharding as it goes
    run = dict(max_batches=max_batches, max_tokens=max_tokens, forward_fn=forward_fn, mask_fn=mask_fn, device=device)

    sets = [("fine", dataloader)] + ([("reference", reference_dataloader)] if reference_dataloader is not None else [])
    collector = _Collector(modules, specs, None, dtype, stop_early)
    gemm = lambda: {str(k[1]).replace("torch.", ""): v for k, v in _GEMM_KIND.items() if k[0] == device.type}  # noqa: E731
    with eval_mode(model):
        table: list = []  # per rank: has a first batch, has a reference set, its number of fine batches
        with dist.agreed("the first batch", lambda: (first is not None, reference_dataloader is not None,
                                                     length_of(dataloader) or 0), table):
            first = next(iter(dataloader), None)
            if first is not None:
                # The order and the sharing of the layer inputs, from one row of the first batch, so
                # that even the first batch stops early (the LM head's logits were a first-batch peak)
                try:
                    _discover(model, collector, _first_row(first), forward_fn, device)
                except CNTLoRAError:
                    raise
                except Exception:  # a forward that needs the whole batch (a fixed batch size): discover on it
                    _discover(model, collector, first, forward_fn, device, what="the first batch")
                if max_stats_memory is not None and collector.discover:  # some layer did not run on that row (MoE?)
                    _discover(model, collector, first, forward_fn, device, what="the first batch")
        _check_ranks(table, sharded)
        if first is not None and iter(dataloader) is dataloader:  # a one-shot iterator: put the batch taken back
            dataloader = itertools.chain([first], dataloader)
            sets[0] = ("fine", dataloader)
        dist.merge_groups(collector)
        passes: List[Optional[List[str]]] = [None]  # None: every layer (discovery may go on into the pass)
        if max_stats_memory is not None:  # every layer's sharing is needed to plan the passes
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
                counts: list = []
                with dist.agreed(f"the {desc} pass", lambda: (batches,), counts), collector.attached():
                    batches, _ = _run_pass(model, loader, collector, desc=desc, progress=progress, **run)
                if (batches := sum(row[0] for row in counts)) == 0:  # over every rank
                    raise CNTLoRAError(f"the {which} dataloader yielded no batches on any rank; pass data")
                dist.merge_groups(collector)
                _finish_discovery(collector)
                results[which], collector.sums = collector.sums, {}
                info[which] = {"batches": batches, "passes": len(passes)}
                leaders = [g for g in specs if collector.groups.get(g) == g and g in collector.active]
                results[which] = dist.all_reduce_sums(results[which], leaders,
                                                      lambda g: Sums.zeros(specs[g].in_features, device, dtype))
                check_sums(which, results[which], collector.groups)
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
