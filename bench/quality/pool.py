"""Several quality runs at once: worker processes sharing one device (small models leave a GPU mostly idle)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from cntlora.config import CNTLoRAError

from .protocol import DEFAULT_CHECKPOINTS, choose_lr, results_dict, run_line, train_lrs
from .task import parse_label

_WORKER = {}  # a worker's tasks, built once per process: {(name, kwargs): Task}


def _task_key(name: str, kwargs: dict) -> tuple:
    return name, tuple(sorted(kwargs.items()))


def _worker_init(threads):
    torch.set_num_threads(threads)


def _worker_job(task_name, task_kwargs, label, seed, lrs, steps, checkpoints, device):
    from .tasks import make_task

    key = _task_key(task_name, task_kwargs)
    if key not in _WORKER:  # each worker builds a task once (loading models, tokenizing)
        _WORKER[key] = make_task(task_name, **task_kwargs)
    return train_lrs(_WORKER[key], label, seed, lrs, steps, checkpoints, device)


@dataclass
class Spec:
    """One run_quality call on a named task (tasks.TASKS), for run_many."""

    name: str
    task: str
    methods: Sequence[str]
    seeds: Sequence[int]
    lrs: Sequence[float]
    steps: int
    task_kwargs: dict = field(default_factory=dict)
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS
    select_seeds: Optional[int] = None
    label_lrs: dict = field(default_factory=dict)  # {label: its own lr grid}, replacing lrs for that label

    def lrs_of(self, label: str) -> Sequence[float]:
        """The lr grid seed 0 (every first seed) runs for `label`."""
        return self.label_lrs.get(label, self.lrs)


class RunLog:
    """A run log: run_many's progress appended to a JSON-lines file, each line flushed at once.

    Lines are {"kind": "meta", "spec": NAME, "data": the task's description} (on_start) and
    {"kind": "run", "spec": NAME, "data": a run record} (on_run); report.load_runs reads them.
    A run cut short by a time limit keeps every line written before.

    Args:
        path: the log; appended to when it exists.
    """

    def __init__(self, path):
        self._file = open(path, "a")

    def on_start(self, spec_name: str, meta: dict) -> None:
        self._write("meta", spec_name, meta)

    def on_run(self, spec_name: str, record: dict) -> None:
        self._write("run", spec_name, record)

    def _write(self, kind: str, spec_name: str, data: dict) -> None:
        self._file.write(json.dumps({"kind": kind, "spec": spec_name, "data": data}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def first_seeds(spec: Spec) -> list:
    """The seeds that run every lr of the spec (all of them unless select_seeds is set)."""
    return list(spec.seeds) if spec.select_seeds is None else list(spec.seeds)[: spec.select_seeds]


def run_many(specs: Sequence[Spec], workers: int = 4, device=None, on_run: Optional[Callable[[str, dict], None]] = None,
             log: Optional[Callable[[str], None]] = print, on_start: Optional[Callable[[str, dict], None]] = None,
             done: Optional[dict] = None) -> dict:
    """Several run_quality calls on named tasks, spread over `workers` processes sharing one device.

    The same protocol as protocol.run_quality (select_seeds included). A job is one init,
    (label, seed), trained at each of its lrs (train_lrs). Jobs run in priority order (earlier
    specs first, a spec's extra seeds as soon as its lrs are chosen), so a run cut short by a
    time limit has finished whole specs, not slices of all. A job that fails is logged and
    skipped. Runs in `done` are not run again: they count as finished (an lr choice among them
    stands), so a run cut short resumes where it stopped and ends as a whole run would have.

    Args:
        specs: what to run.
        workers: worker processes (spawned; each builds its tasks once).
        device: cuda or cpu for every worker; None picks cuda when available.
        on_run: on_run(spec name, record) sees every finished run, e.g. to append it to a log file.
        log: called with one line per finished or failed run; None is silent.
        on_start: on_start(spec name, results without runs) sees each spec's task description first.
        done: {spec name: run records already finished} (e.g. report.load_runs of earlier logs,
            keyed by spec name); they are returned with the new runs but not passed to on_run.

    Returns:
        {spec.name: results (protocol.results_dict)}.

    Raises:
        CNTLoRAError: a bad label, an unknown task, or two specs that select an lr under one name.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from .tasks import make_task

    selecting = [spec.name for spec in specs if spec.select_seeds is not None]
    if len(set(selecting)) < len(selecting):
        raise CNTLoRAError(f"specs that select an lr need their own names (run_many counts their runs by name); "
                           f"rename the repeated ones among {sorted(selecting)}")
    built = {}
    for spec in specs:
        for label in spec.methods:
            parse_label(label)
        key = _task_key(spec.task, spec.task_kwargs)
        if key not in built:
            built[key] = make_task(spec.task, **spec.task_kwargs)
    task_of = {spec.name: built[_task_key(spec.task, spec.task_kwargs)] for spec in specs}
    runs = {spec.name: list((done or {}).get(spec.name, ())) for spec in specs}
    logged = {(name, r["label"], r["seed"], r["lr"]) for name, rs in runs.items() for r in rs}

    def todo(spec, label, seed, lrs):
        return tuple(lr for lr in lrs if (spec.name, label, seed, lr) not in logged)

    if on_start:
        for spec in specs:
            on_start(spec.name, {**results_dict(task_of[spec.name], spec.steps, []), "task": spec.name})
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    waiting = [(i, spec, label, seed, todo(spec, label, seed, spec.lrs_of(label))) for i, spec in enumerate(specs)
               for label in spec.methods for seed in first_seeds(spec)]
    waiting = [job for job in waiting if job[4]]
    left = {spec.name: sum(job[1] is spec for job in waiting) for spec in specs}

    def more_seeds(spec):  # the spec's lrs are chosen: its other seeds at each label's choice
        hib = task_of[spec.name].higher_is_better
        for name in spec.methods:
            mine = [x for x in runs[spec.name] if x["label"] == name and x["seed"] in first_seeds(spec)]
            if mine:  # none when every job of this label failed
                best = choose_lr(mine, hib)
                waiting.extend((specs.index(spec), spec, name, s, (best,)) for s in list(spec.seeds)[spec.select_seeds:]
                               if todo(spec, name, s, (best,)))

    for spec in specs:
        if left[spec.name] == 0 and spec.select_seeds is not None:
            more_seeds(spec)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        running = {}

        def fill():
            waiting.sort(key=lambda job: job[0])
            while waiting and len(running) < workers + 2:
                i, spec, label, seed, lrs = waiting.pop(0)
                f = pool.submit(_worker_job, spec.task, spec.task_kwargs, label, seed, lrs, spec.steps,
                                tuple(spec.checkpoints), device)
                running[f] = (spec, label, seed)

        fill()
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                spec, label, seed = running.pop(f)
                try:
                    records = f.result()
                except Exception as e:  # one failing init (e.g. a PEFT method on a new model) must not end the run
                    records = []
                    if log:
                        log(f"{spec.name} {label} seed={seed}: FAILED: {type(e).__name__}: {e}")
                for r in records:
                    runs[spec.name].append(r)
                    if on_run:
                        on_run(spec.name, r)
                    if log:
                        log(run_line(spec.name, r))
                left[spec.name] -= 1
                if left[spec.name] == 0 and spec.select_seeds is not None:
                    more_seeds(spec)
            fill()
    return {spec.name: {**results_dict(task_of[spec.name], spec.steps, runs[spec.name]), "task": spec.name}
            for spec in specs}
