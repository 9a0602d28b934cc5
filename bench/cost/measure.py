"""The cost benchmark's measurements: wall time and peak memory of each init, medians over repeats.

benchmark(args) builds the model and batches (inits.py), runs every method round robin for
--repeats rounds, and writes the result file after every run, so a run cut short by a time
limit still leaves what it measured (finish_partial turns that into medians).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics as pystats
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from cntlora.config import AdvancedConfig, CNTLoRAConfig
from cntlora.files import atomic_write, write_json
from cntlora.plan import RANDOMIZED_SVD_ABOVE, synchronize

from .inits import (LINEAR_KINDS, build_model, calibration_batches, run_cntlora, run_eva, run_floor, run_peft,
                    torch_dtype)

# The slow data-driven inits may get fewer repeats (--slow-repeats) to fit a device budget.
SLOW = {"eva", "corda"}


class _RssSampler:
    """Samples this process's resident set size every few ms; .peak is the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, self.read(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _release_freed_memory() -> None:
    """Hand memory freed by earlier runs back to the OS, so it does not hide this run's RSS peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be understated
        pass


def measure(fn: Callable[[], dict], device: torch.device) -> dict:
    """Run fn once; its wall time and the peak memory above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        extra = fn() or {}
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        _release_freed_memory()
        base = _RssSampler.read()
        with _RssSampler() as sampler:
            t0 = time.perf_counter()
            extra = fn() or {}
            seconds = time.perf_counter() - t0
        peak = sampler.peak - base
    return {"seconds": seconds, "peak_memory_bytes": int(max(peak, 0)), **extra}

def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _device_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "h200" if "H200" in name else name.lower().replace(" ", "-")


def _median_entry(runs: List[dict], floor: Optional[float]) -> dict:
    seconds = pystats.median(r["seconds"] for r in runs)
    out = {"runs": runs, "repeats": len(runs), "median_seconds": seconds,
           "median_peak_memory_bytes": int(pystats.median(r["peak_memory_bytes"] for r in runs))}
    if "phases" in runs[0]:
        out["median_phases"] = {k: pystats.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]}
    if floor:
        out["ratio_to_floor"] = seconds / floor
    return out


def benchmark(args) -> dict:
    """Time every method of args.methods on one model and one set of calibration batches.

    Args:
        args: command.add_arguments' options (model, device, dtype, seqs, seq_len, batch_size, r,
            methods with floor first, repeats, warmup, out...).

    Returns:
        The result, also written to args.out (when set) after every run: the model, machine
        and settings, and per method its runs and medians (or its error).
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = build_model(args.model, device, dtype, args.seed)
    build_seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    # Batches stay on the host, as a data loader yields them; every method moves them itself.
    batches = calibration_batches(args.model, tokenizer, model.config.vocab_size, args.seqs, args.seq_len,
                                  args.batch_size, args.seed)
    lora_kwargs = {"r": args.r, "lora_alpha": args.r, "target_modules": list(LINEAR_KINDS)}
    # On the CPU the model has real weights, and the inits that rewrite W0 (PiSSA, OLoRA, CorDA,
    # LoRA-GA) would change what the next run sees: restore them. Random GPU weights are reused.
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.restore_weights else None
    result = {
        "model": args.model, "params": params, "device": _device_label(device), "dtype": str(dtype).replace("torch.", ""),
        "tokens": args.seqs * args.seq_len, "seqs": args.seqs, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "r": args.r, "targets": LINEAR_KINDS, "machine": _machine(device), "versions": _versions(),
        "build_seconds": build_seconds,
        # the options, less the command-line plumbing (the command's function) and --summarize
        "settings": {k: v for k, v in vars(args).items() if not callable(v) and k != "summarize"},
        "peak_memory": "extra over the memory allocated before the init: GPU max_memory_allocated, or sampled CPU RSS",
        "methods": {},
    }

    holder: dict = {"model": model}

    def reset():
        """Take the adapters off again (and restore W0 where asked) so the next init starts clean."""
        current = holder["model"]
        base = current.unload() if hasattr(current, "unload") else current
        base.zero_grad(set_to_none=True)
        if pristine is not None:
            base.load_state_dict(pristine)
        holder["model"] = base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def one(method: str) -> dict:
        m = holder["model"]
        if method == "floor":
            return run_floor(m, batches, device)
        if method.startswith("cntlora-"):
            return run_cntlora(m, batches, device, args, lora_kwargs, holder, method)
        if method == "eva":
            return run_eva(m, batches, device, lora_kwargs, args.eva_cap_seconds, holder)
        return run_peft(method, m, batches, device, lora_kwargs, holder)

    for _ in range(args.warmup):  # kernels, cuBLAS/cuSOLVER handles and allocator pools, untimed
        for method in args.methods:
            if method == "floor" or method.startswith("cntlora-"):
                one(method)
                reset()

    # Round robin: every method once per round, so a machine whose load drifts (a shared CPU)
    # slows the floor and the inits alike; the slow inits run in the first rounds only.
    repeats = {m: (args.slow_repeats if (m in SLOW and args.slow_repeats) else args.repeats) for m in args.methods}
    runs: Dict[str, List[dict]] = {m: [] for m in args.methods}
    first_ours = next((m for m in args.methods if m.startswith("cntlora-")), None)  # profiled and ablated
    for round_index in range(max(repeats.values())):
        for method in args.methods:
            if len(runs[method]) > round_index or round_index >= repeats[method] or "error" in result["methods"].get(method, {}):
                continue
            try:
                runs[method].append(measure(lambda: one(method), device))
                reset()
            except Exception as e:  # noqa: BLE001 - an init that fails (e.g. out of memory) is reported, not fatal
                reset()
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                result["methods"][method] = {"error": error, "runs": runs[method]}
                _progress(args, f"{method}: FAILED {error}")
                _write(args.out, result)
                continue
            _progress(args, f"{method} run {round_index + 1}/{repeats[method]}: {runs[method][-1]['seconds']:.3f} s")
            result["methods"][method] = {"runs": runs[method], "complete": False}
            _write(args.out, result)
            if method == first_ours and round_index == 0:  # before the slow inits: a time limit cannot cut these
                if args.profile:
                    result["profile"] = profile_cntlora(holder["model"], batches, device, args, lora_kwargs, args.profile)
                if args.ablate_svd:
                    result["svd_ablation"] = svd_ablation(holder["model"], batches, device, args, lora_kwargs)
                _write(args.out, result)

    _medians(result, runs, args.eva_cap_seconds, lambda line: _progress(args, line))
    _write(args.out, result)
    return result


def _medians(result: dict, runs: Dict[str, List[dict]], eva_cap: Optional[float], report=lambda line: None) -> None:
    """Replace each method's recorded runs by its median entry."""
    floor = pystats.median(r["seconds"] for r in runs["floor"]) if runs.get("floor") else None
    for method, method_runs in runs.items():
        if "error" in result["methods"].get(method, {}) or not method_runs:
            continue
        entry = _median_entry(method_runs, floor)
        if method == "eva":
            entry["finished"] = all(r["finished"] for r in method_runs)
            if not entry["finished"]:
                entry["cap_seconds"] = eva_cap
        result["methods"][method] = entry
        report(f"{method}: {entry['median_seconds']:.3f} s"
               + (f" ({entry['ratio_to_floor']:.2f}x floor)" if "ratio_to_floor" in entry else "")
               + f", +{entry['median_peak_memory_bytes'] / 2**30:.2f} GiB")
    result["order"] = "round robin: every method once per round (slow inits in the first --slow-repeats rounds)"


def finish_partial(path: str) -> dict:
    """Medians of the runs a result file recorded before its process was stopped (a time limit).

    Methods keep the runs they finished (their `repeats` says how many); the file is marked
    `cut_short` and rewritten in place.

    Args:
        path: a result file benchmark() wrote.

    Returns:
        The result, rewritten; as it was when no method is incomplete.
    """
    with open(path) as f:
        result = json.load(f)
    runs = {m: e["runs"] for m, e in result["methods"].items() if e.get("complete") is False}
    if not runs:
        return result
    _medians(result, runs, result["settings"].get("eva_cap_seconds"))
    result["cut_short"] = "stopped by its time limit; each method's median is over the runs it finished"
    _write(path, result)
    return result


def svd_ablation(model, batches, device, args, lora_kwargs) -> dict:
    """solve() time on one set of statistics: the exact SVD up to 2048 against --randomized-svd-above
    or the default (256; above it a randomized SVD, which on the CPU above 2048 never forms ΔW)."""
    from cntlora.collect import collect_statistics
    from cntlora.plan import solve

    stats = collect_statistics(model, batches, lora_kwargs["target_modules"], max_stats_memory=args.max_stats_memory,
                               offload=args.offload, progress=False, stats_dtype=torch_dtype(args.stats_dtype))
    out = {}
    for above in sorted({2048, args.randomized_svd_above or RANDOMIZED_SVD_ABOVE}):
        config = CNTLoRAConfig(r=args.r, alpha=float(args.r), seed=args.seed,
                               advanced=AdvancedConfig(randomized_svd_above=above))
        t0 = time.perf_counter()
        plan = solve(model, stats, config)
        synchronize(device)
        out[str(above)] = {"seconds": time.perf_counter() - t0, **plan.timings}
        _progress(args, f"svd ablation, randomized above {above}: {out[str(above)]}")
    return out


def profile_cntlora(model, batches, device, args, lora_kwargs, path: str) -> dict:
    """One CNTLoRA init under torch.profiler; writes the top operators by device (or CPU) time to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    holder = {"model": model}
    with profile(activities=activities) as prof:
        info = run_cntlora(model, batches, device, args, lora_kwargs, holder)
    averages = prof.key_averages()
    tables = []
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else []
    for sort_by in keys + ["self_cpu_time_total"]:
        try:
            tables.append(f"sorted by {sort_by}\n" + averages.table(sort_by=sort_by, row_limit=30))
            break
        except Exception:  # noqa: BLE001 - the key's name changed across torch versions
            continue
    text = f"phases (s): {json.dumps(info['phases'])}\n\n" + "\n\n".join(tables)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    holder["model"].unload()
    return {"phases": info["phases"], "table": os.path.basename(path)}


def _machine(device: torch.device) -> dict:
    out = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    return out


def _progress(args, line: str) -> None:
    if not args.quiet:
        print(f"[cost {args.model}] {line}", flush=True)


def _write(path: Optional[str], result: dict) -> None:
    if path:
        write_json(path, result, indent=1)


