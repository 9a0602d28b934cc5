"""Initialization cost: wall time and peak memory of CNTLoRA's init against the floor and PEFT's inits.

For one model and one set of calibration batches, in one process, this times
- the floor: one plain forward pass of the model over the calibration batches;
- CNTLoRA (self mode, the default; also cross, and self with offloaded statistics), split into
  collect / solve / decompose / apply;
- PEFT's default, pissa_niter_4, olora, eva, corda and lora_ga inits, on the same model and data,
and writes medians over --repeats runs, and their ratios to the floor, to a JSON file.

    cntlora bench cost --model smollm2 --out bench/results/cost-smollm2-cpu.json
    cntlora bench cost --model llama-1b --device cuda --out cost-llama-1b-h200.json
    cntlora bench cost --summarize bench/results/cost-*-*.json

Peak memory is the extra over what was allocated before the init started (the model, the
batches): GPU max_memory_allocated on CUDA, the sampled resident set size (RSS) on the CPU.
`--summarize` gathers result files into bench/results/cost-summary.json and a scaling plot.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics as pystats
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from ..units import byte_size
from ..config import AdvancedConfig, CNTLoRAConfig, CNTLoRAError
from ..plan import RANDOMIZED_SVD_ABOVE, synchronize
from ..batches import default_forward, to_device
from ..files import atomic_write

LINEAR_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama shapes (random weights: the cost does not depend on the weights' values).
LLAMA_SHAPES = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
MODELS = ["smollm2"] + list(LLAMA_SHAPES)
METHODS = ["floor", "cntlora-self", "cntlora-self-offload", "cntlora-cross", "default", "pissa_niter_4", "olora", "lora_ga", "corda", "eva"]
# The slow data-driven inits may get fewer repeats (--slow-repeats) to fit a device budget.
SLOW = {"eva", "corda"}
SUMMARY_KEYS = ["model", "params", "device", "tokens", "method", "init_seconds", "floor_seconds",
                "peak_memory_bytes", "repeats"]


class EvaCapReached(Exception):
    """Raised from EVA's forward function once the stated time cap has passed."""


# ----------------------------------------------------------------------------- models and data

def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """(model, tokenizer or None) in eval mode on `device`."""
    if name == "smollm2":
        from .. import zoo

        model, tokenizer = zoo.load_smollm2()
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if name not in LLAMA_SHAPES:
        raise CNTLoRAError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_SHAPES[name], max_position_embeddings=8192, rope_theta=500000.0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), None


def calibration_batches(name: str, tokenizer, vocab_size: int, seqs: int, seq_len: int, batch_size: int, seed: int):
    """Token batches ({input_ids, attention_mask}): Shakespeare for SmolLM2, seeded random tokens otherwise."""
    if name == "smollm2":
        from .. import zoo

        text = "\n\n".join(zoo.shakespeare().values())
        batches = zoo.lm_batches(tokenizer, text, seqs, seq_len, batch_size)
        return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (seqs, seq_len), generator=gen)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids.split(batch_size)]


def lm_loss(model, batch):
    """Next-token loss on the batch's own tokens (what LoRA-GA takes gradients of)."""
    return model(**batch, labels=batch["input_ids"]).loss


# ----------------------------------------------------------------------------- measuring

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


# ----------------------------------------------------------------------------- the inits

def run_floor(model, batches, device) -> dict:
    with torch.no_grad():
        for b in batches:
            default_forward(model, to_device(b, device))
    synchronize(device)
    return {}


def run_cntlora(model, batches, device, args, lora_kwargs, holder: dict, method: str = "cntlora-self") -> dict:
    """cntlora.initialize, with the time of each phase: collect, solve, decompose, apply.

    `method` is cntlora-<mode>, or cntlora-<mode>-offload: statistics go to the host after each
    pass and each input's come back for its solve, which trades time for GPU memory. Without
    offload, a memory-capped collection solves each pass as it ends (initialize's default)."""
    from ..apply import initialize

    overrides = {} if args.randomized_svd_above is None else {"randomized_svd_above": args.randomized_svd_above}
    mode, _, variant = method.removeprefix("cntlora-").partition("-")
    config = CNTLoRAConfig(mode=mode, r=lora_kwargs["r"], alpha=float(lora_kwargs["lora_alpha"]), seed=args.seed,
                           **overrides)
    holder["model"] = initialize(model, batches, config, target_modules=lora_kwargs["target_modules"],
                                 max_stats_memory=args.max_stats_memory, offload=args.offload or variant == "offload",
                                 stats_dtype=_dtype(args.stats_dtype), progress=False)
    synchronize(device)
    plan = holder["model"].cntlora_plan
    t = plan.timings
    return {"phases": {"collect": t["collect"], "solve": t["solve"], "decompose": t["decompose"], "apply": t["apply"]},
            "stats_info": {k: v for k, v in plan.stats_info.items() if k != "bytes"},
            "stats_bytes": plan.stats_info["bytes"]}


def run_eva(model, batches, device, lora_kwargs, cap_seconds: Optional[float], holder: dict) -> dict:
    """PEFT's EVA through its public API (defaults for language modelling), stopped after cap_seconds."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import _Hook, initialize_lora_eva_weights

    config = LoraConfig(**lora_kwargs, init_lora_weights="eva", eva_config=EvaConfig())
    peft_model = holder["model"] = get_peft_model(model, config, low_cpu_mem_usage=True)
    start, forwards = time.perf_counter(), [0]

    def over_cap(*_):
        if cap_seconds is not None and time.perf_counter() - start > cap_seconds:
            raise EvaCapReached

    def forward(m, batch):
        over_cap()
        forwards[0] += 1
        return m(**batch)

    # EVA's own hooks do its SVD work inside the forward pass, so the cap is checked before every
    # module, not only between batches (a 30 s cap once ran to 153 s on the 1B shape)
    checks = [module.register_forward_pre_hook(over_cap) for module in peft_model.modules()]
    finished = True
    try:
        initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward, show_progress_bar=False)
    except EvaCapReached:
        finished = False
        for module in peft_model.modules():  # EVA's SVD hooks stay behind when it is stopped
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _Hook):
                    del module._forward_hooks[key]
    finally:
        for handle in checks:
            handle.remove()
    synchronize(device)
    return {"finished": finished, "forward_batches": forwards[0], "passes_over_data": forwards[0] / len(batches)}


def run_peft(method, model, batches, device, lora_kwargs, holder: dict) -> dict:
    from .baselines import peft_init

    # peft_init feeds CorDA one sequence at a time itself (its covariance hook takes batch size 1)
    holder["model"] = peft_init(method, model, dict(lora_kwargs), batches, loss_fn=lm_loss)
    synchronize(device)
    return {}


def _dtype(name: Optional[str]):
    return None if name is None else getattr(torch, name)


# ----------------------------------------------------------------------------- one benchmark

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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
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
        "settings": {k: v for k, v in vars(args).items() if k not in ("handler", "summarize")},
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
    `cut_short` and rewritten in place."""
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
    from ..plan import solve
    from ..collect import collect_statistics

    stats = collect_statistics(model, batches, lora_kwargs["target_modules"], max_stats_memory=args.max_stats_memory,
                               offload=args.offload, progress=False, stats_dtype=_dtype(args.stats_dtype))
    out = {}
    for above in sorted({2048, args.randomized_svd_above or RANDOMIZED_SVD_ABOVE}):
        config = CNTLoRAConfig(r=args.r, alpha=float(args.r), seed=args.seed, advanced=AdvancedConfig(randomized_svd_above=above))
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
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))
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
        atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1)))


# ----------------------------------------------------------------------------- summary and plot

def summarize(paths: List[str]) -> dict:
    """cost-summary.json's rows from result files: one per (model, device, method) that ran without error.

    Where several files hold the same (model, device, method), the last file given wins (e.g. a
    round-robin re-measurement of the floor and CNTLoRA); each row's floor_seconds comes from
    its own file. An EVA run stopped at its cap is named "eva-capped"; its time is the cap it
    hit, a lower bound.
    """
    rows: Dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        floor = res["methods"].get("floor", {}).get("median_seconds")
        for method, entry in res["methods"].items():
            if "error" in entry or not entry.get("runs") or entry.get("complete") is False:
                continue
            name = "eva-capped" if method == "eva" and not entry.get("finished", True) else method
            key = (res["model"], res["device"], method)
            rows.pop(key, None)  # re-insert: the row keeps the last file's place
            rows[key] = {"model": res["model"], "params": int(res["params"]), "device": res["device"],
                         "tokens": int(res["tokens"]), "method": name, "init_seconds": entry["median_seconds"],
                         "floor_seconds": floor, "peak_memory_bytes": int(entry["median_peak_memory_bytes"]),
                         "repeats": int(entry["repeats"])}
    return {"runs": list(rows.values())}


def markdown_table(paths: List[str]) -> str:
    """One markdown table per result file: median time, ratio to the floor, CNTLoRA's phases, extra peak memory."""
    out = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        floor = res["methods"].get("floor", {}).get("median_seconds")
        out.append(f"**{res['model']}** ({res['params'] / 1e9:.2f} B parameters, {res['dtype']}) on {res['device']}, "
                   f"{res['seqs']}×{res['seq_len']} = {res['tokens']:,} tokens, r={res['r']}\n")
        out.append("| method | init seconds (median) | × floor | runs | extra peak memory | notes |")
        out.append("|---|---|---|---|---|---|")
        for method, e in res["methods"].items():
            if "error" in e:
                out.append(f"| {method} | – | – | {len(e.get('runs', []))} | – | failed: {e['error']} |")
                continue
            if e.get("complete") is False:
                out.append(f"| {method} | – | – | {len(e['runs'])} | – | cut off by the run's time limit |")
                continue
            notes = ""
            if "median_phases" in e:
                notes = "collect {collect:.2f} + solve {solve:.2f} + decompose {decompose:.2f} + apply {apply:.2f} s".format(
                    **e["median_phases"])
            if method == "eva":
                fwd = e["runs"][0].get("passes_over_data")
                notes = ("converged" if e.get("finished") else f"stopped at the {e.get('cap_seconds'):g} s cap "
                         "(did not converge): a lower bound") + (f"; {fwd:.1f} passes over the data" if fwd else "")
            ratio = f"{e['median_seconds'] / floor:.2f}" if floor else "–"
            gib = e["median_peak_memory_bytes"] / 2**30
            out.append(f"| {method} | {e['median_seconds']:.2f} | {ratio} | {e['repeats']} | {gib:.2f} GiB | {notes} |")
        out.append("")
    return "\n".join(out)


def plot(summary: dict, path: str) -> None:
    """Init time against model size, one line per method, a panel per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in summary["runs"]})
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4.5), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        rows = [r for r in summary["runs"] if r["device"] == dev]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["params"], r["init_seconds"]) for r in rows if r["method"] == method)
            base = method.replace("-capped", "")
            color = "black" if base == "floor" else f"C{METHODS.index(base) % 10}" if base in METHODS else None
            style = "x--" if base == "floor" else ("o-" if base.startswith("cntlora") else ".-")
            ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], style, color=color, label=method,
                    linewidth=2 if base.startswith("cntlora") else 1, markersize=8 if base != "default" else 5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("initialization time (s, median)")
        ax.set_title(f"device: {dev}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="smollm2",
                        help="smollm2 (real weights, Shakespeare) or a Llama shape with random weights and tokens")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--seqs", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (CorDA gets them one by one)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of every method (lora_alpha = r)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="what to time; put floor first so the others get ratios")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (the median is reported)")
    parser.add_argument("--slow-repeats", type=int, default=None, help="timed runs for eva and corda")
    parser.add_argument("--warmup", type=int, default=1, help="untimed floor + CNTLoRA runs first")
    parser.add_argument("--eva-cap-seconds", type=float, default=None,
                        help="stop EVA after this long (its loop has no cap); reported as eva-capped")
    parser.add_argument("--max-stats-memory", type=byte_size, default=None, help="CNTLoRA's statistics cap, e.g. 24GiB")
    parser.add_argument("--offload", action="store_true", help="move finished statistics to the CPU")
    parser.add_argument("--stats-dtype", choices=["float32", "float64"], default=None,
                        help="CNTLoRA's running sums (default: float32 on GPUs, float64 on the CPU)")
    parser.add_argument("--randomized-svd-above", type=int, default=None,
                        help="CNTLoRAConfig.randomized_svd_above (default: the config's)")
    parser.add_argument("--restore-weights", action="store_true",
                        help="restore W0 after every init (inits like PiSSA rewrite it); needed for real weights")
    parser.add_argument("--ablate-svd", action="store_true", help="also time solve() with the default SVD threshold")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of one CNTLoRA init here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="result JSON (written after every method)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--finish-partial", nargs="+", default=None, metavar="RESULT_JSON",
                        help="turn the runs of result files cut short by a time limit into medians, in place")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="RESULT_JSON",
                        help="instead of measuring: gather result files into --summary-out and --plot")
    parser.add_argument("--summary-out", default="bench/results/cost-summary.json")
    parser.add_argument("--plot", default="bench/results/cost-scaling.png")


def run(args) -> int:
    for path in args.finish_partial or []:
        finish_partial(path)
        print(f"{path}: medians over the runs it finished")
    if args.finish_partial and not args.summarize:
        return 0
    if args.summarize:
        summary = summarize(args.summarize)
        atomic_write(args.summary_out, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
        plot(summary, args.plot)
        print(markdown_table(args.summarize))
        print(f"wrote {args.summary_out} ({len(summary['runs'])} rows) and {args.plot}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.methods and "floor" in args.methods and args.methods[0] != "floor":
        args.methods = ["floor"] + [m for m in args.methods if m != "floor"]
    benchmark(args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cntlora.bench.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
