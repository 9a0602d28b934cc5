"""torch.distributed support: wrapped and sharded models, agreement between ranks, the shared solve.

Every rank runs the same collectives in the same order:
- each local phase (reading the first batch, a pass over the data, a part of the solve) ends
  with `agreement`: one all-reduce of a small table in which every rank writes whether it
  failed and a few counts. A failure on any rank becomes a CNTLoRAError on every rank, naming
  the failing rank and its error, instead of a hang in the next collective;
- the sums of every distinct layer input of a pass are all-reduced in one fixed order, zeros
  standing in for inputs a rank never saw (a rank without data);
- a collective that fails (a rank died, or the process group's timeout ran out) becomes a
  CNTLoRAError that says so.

DistributedDataParallel (and DataParallel) wrappers are unwrapped: hooks, layer names and the
forward pass use the wrapped module, so names carry no "module." prefix and the wrapper's own
collectives (buffer broadcasts) never run during the collection. FSDP2 (`fully_shard`) keeps
the model's structure, and its weights are DTensors: W0 is gathered one layer at a time
(`full_weight`), and residual updates are written into each rank's shard (`subtract_from_weight`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .config import CNTLoRAError

# How a distributed solve is split: "rank0" (rank 0 solves every layer and broadcasts the plan)
# or "shared" (every rank solves its share of the layer inputs; rank 0 builds the plan from them)
SOLVE_MODES = ("rank0", "shared")
AGREEMENT_VALUES = 4  # integers a rank can share in one agreement


def active() -> bool:
    """Whether a torch.distributed process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress bars (rank 0, or no process group)."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (any depth), else `model`."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2-sharded parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def full_weight(w: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered (a collective: every rank must call it, in the
    same order); a plain tensor is returned as it is."""
    return w.full_tensor() if is_sharded(w) else w


def local_weight(w: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication), or the tensor itself."""
    return w.to_local() if is_sharded(w) else w


def subtract_from_weight(w: torch.Tensor, delta: torch.Tensor) -> None:
    """w -= delta in place; for a DTensor each rank subtracts its own slice of `delta` (which
    must be the same on every rank), without communication."""
    if is_sharded(w):
        from torch.distributed.tensor import distribute_tensor

        delta = distribute_tensor(delta, w.device_mesh, w.placements, src_data_rank=None)
    w.sub_(delta)


def _flag_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(run: Callable, what: str):
    """Run a collective; a failure (a rank gone, the process group's timeout) becomes a CNTLoRAError."""
    try:
        return run()
    except CNTLoRAError:
        raise
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CNTLoRAError(
            f"rank {rank()} of {world_size()}: the collective after {what} failed ({type(e).__name__}: {first}); "
            "another rank stopped or is stuck. Look at the other ranks' output; how long a rank waits is the "
            "process group's timeout (init_process_group(timeout=...))"
        ) from e


def agreement(error: Optional[BaseException], what: str, values: Sequence[int] = ()) -> List[List[int]]:
    """Every rank reports whether `what` failed on it, plus a few integers; a failure anywhere
    raises on every rank.

    Args:
        error: the exception this rank hit, or None.
        what: the phase, for the message ("the fine pass").
        values: integers this rank shares (batch counts, whether it has data).

    Returns:
        One row per rank: that rank's `values` (a single row, this rank's, without a process group).

    Raises:
        CNTLoRAError: some rank failed (naming every failing rank and the first one's error), or
            the collective itself failed.
    """
    if not active():
        if error is not None:
            raise error
        return [list(values)]
    import torch.distributed as dist

    if len(values) > AGREEMENT_VALUES:
        raise CNTLoRAError(f"agreement takes at most {AGREEMENT_VALUES} values")
    world, me = world_size(), rank()
    # one width for every call: a failing rank, which knows no values, sends a table of the same size
    table = torch.zeros(world, 1 + AGREEMENT_VALUES, dtype=torch.int64, device=_flag_device())
    table[me, 0] = int(error is not None)
    if len(values):
        table[me, 1:1 + len(values)] = torch.tensor([int(v) for v in values], dtype=torch.int64)
    _collective(lambda: dist.all_reduce(table), what)
    rows = table.cpu().tolist()
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        message = "" if error is None else f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        messages: List[Optional[str]] = [None] * world
        _collective(lambda: dist.all_gather_object(messages, message), what)
        ranks = ", ".join(str(r) for r in failed)
        raise CNTLoRAError(
            f"rank {ranks} of {world} failed during {what} ({messages[failed[0]]}); every rank stops here. Fix the "
            f"data or model of rank {failed[0]} (its own output has the traceback) and launch again"
        ) from error
    return [row[1:1 + len(values)] for row in rows]


@contextmanager
def agreed(what: str, values: Callable[[], Sequence[int]] = lambda: (), out: Optional[list] = None) -> Iterator[None]:
    """Run the body, then `agreement` on its outcome; `out` (a list) receives the table of values.

    Without a process group an exception from the body propagates unchanged.
    """
    try:
        yield
    except Exception as e:
        if not active():
            raise
        agreement(e, what)
        raise  # not reached: agreement raised on every rank
    rows = agreement(None, what, values())
    if out is not None:
        out[:] = rows


def merge_groups(collector) -> None:
    """Give every rank the union of the input sharing the ranks discovered (a rank without data
    discovers nothing), and the longest first-run order."""
    if not active():
        return
    import torch.distributed as dist

    seen: List[Optional[tuple]] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(seen, (dict(collector.groups), list(collector.order))), "discovery")
    merged: Dict[str, str] = {}
    for groups, _ in seen:
        for name, lead in groups.items():
            if merged.setdefault(name, lead) != lead:
                raise CNTLoRAError(f"the ranks disagree on which layers share the input of {name!r}; run the same "
                                   "model on every rank")
    collector.groups = merged
    order = max((o for _, o in seen), key=len)
    if len(order) > len(collector.order):
        collector.order = order
        collector.fired = set(order)
    if collector.discover and len(merged) == len(collector.modules):
        collector.discover = False
        collector.plan_stop()


def all_reduce_sums(sums: dict, leaders: Sequence[str], zeros: Callable[[str], object]) -> dict:
    """All-reduce the sums of `leaders` in that order (every rank passes the same list);
    zeros(leader) stands in for an input this rank never saw. Returns {leader: Sums}."""
    if not active():
        return sums
    import torch.distributed as dist

    out = {}
    for g in leaders:
        s = sums[g] if g in sums else zeros(g)
        for t in s.tensors():
            _collective(lambda: dist.all_reduce(t), "the pass (all-reducing the sums)")
        out[g] = s
    return out


def check_sharded_lengths(rows: List[List[int]], column: int, what: str) -> None:
    """Under FSDP2 every forward pass is a collective: refuse ranks with different batch counts."""
    counts = [row[column] for row in rows]
    if len(set(counts)) > 1:
        raise CNTLoRAError(f"the {what} dataloaders have {counts} batches on the ranks; with sharded (FSDP2) weights "
                           "every forward pass is a collective, so every rank needs the same number of batches "
                           "(use a DistributedSampler, or pass max_batches=)")


def share_of(part, me: int, world: int):
    """The layers of a Statistics part this rank solves: whole input groups (so their system is
    factorized once), spread over the ranks by the cost of their solve, largest first."""
    from .statistics import Statistics, model_fingerprint

    leaders = list(dict.fromkeys(part.groups[n] for n in part.layers))

    def cost(g):
        n = part.layers[g].in_features
        return n ** 3 + sum(s.out_features * n * n for name, s in part.layers.items() if part.groups[name] == g)

    load = [0] * world
    owner = {}
    for g in sorted(leaders, key=lambda g: (-cost(g), leaders.index(g))):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[g] = r
        load[r] += cost(g)
    mine = [n for n in part.layers if owner[part.groups[n]] == me]
    if not mine:
        return None
    layers = {n: part.layers[n] for n in mine}
    keep = {part.groups[n] for n in mine}
    return Statistics(layers=layers, groups={n: part.groups[n] for n in mine},
                      fine={g: s for g, s in part.fine.items() if g in keep},
                      reference=None if part.reference is None else {g: s for g, s in part.reference.items() if g in keep},
                      fingerprint=model_fingerprint(layers), weight_digest={n: part.weight_digest[n] for n in mine},
                      info=part.info)


def solve_parts(model: nn.Module, parts, solver, how: str, release: bool):
    """The distributed solve behind cntlora.solve_parts: returns the Plan, identical on every rank.

    rank0: rank 0 adds every part to `solver`; shared: each rank adds its share of every part,
    and rank 0 gathers the others' spectra. Sharded (FSDP2) weights are gathered layer by layer,
    a collective, so then every rank runs the whole solve in step and rank 0's plan is kept.
    """
    import torch.distributed as dist

    if how not in SOLVE_MODES:
        raise CNTLoRAError(f"distributed_solve={how!r}; use one of {SOLVE_MODES}")
    me, world = rank(), world_size()
    sharded = None
    bytes_seen = 0
    for part in parts:  # every rank iterates: the collection all-reduces each pass
        if sharded is None:
            modules = dict(model.named_modules())
            sharded = any(is_sharded(getattr(modules.get(n), "weight", None)) for n in part.layers)
        bytes_seen += part.nbytes()
        with agreed("the solve"):
            if sharded or (how == "rank0" and me == 0):
                solver.add(part, release)
            elif how == "shared":
                mine = share_of(part, me, world)
                if mine is not None:
                    solver.add(mine, release)
            solver.stats_info = {**part.info, "bytes": bytes_seen}
        del part
    if how == "shared" and not sharded:
        mine = (solver.specs, solver.spectra, solver.w0_norms, solver.shifts, solver.timings, solver.source)
        theirs = [None] * world if me == 0 else None
        _collective(lambda: dist.gather_object(mine, theirs, dst=0), "the solve (gathering the spectra)")
        if me == 0:
            for specs, spectra, norms, shifts, timings, source in theirs[1:]:
                solver.specs.update(specs)
                solver.spectra.update(spectra)
                solver.w0_norms.update(norms)
                solver.shifts.update(shifts)
                solver.source = solver.source if source is None else source
                for phase, seconds in timings.items():  # the ranks solve side by side: the slowest one's time
                    solver.timings[phase] = max(solver.timings[phase], seconds)
    plan = None
    with agreed("building the plan"):
        plan = solver.plan() if me == 0 else None
    box = [plan]
    _collective(lambda: dist.broadcast_object_list(box, src=0), "the plan's broadcast")
    return box[0]
