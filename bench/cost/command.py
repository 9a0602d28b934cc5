"""Initialization cost: wall time and peak memory of CNTLoRA's init against the floor and PEFT's inits.

For one model and one set of calibration batches, in one process, this times
- the floor: one plain forward pass of the model over the calibration batches;
- CNTLoRA (self mode, the default; also cross, and self with offloaded statistics), split into
  collect / solve / decompose / apply;
- PEFT's default, pissa_niter_4, olora, eva, corda and lora_ga inits, on the same model and data,
and writes medians over --repeats runs, and their ratios to the floor, to a JSON file.

    python -m bench.cost --model smollm2 --out bench/results/cost-smollm2-cpu.json
    python -m bench.cost --model llama-1b --device cuda --out cost-llama-1b-h200.json
    python -m bench.cost --summarize bench/results/cost-*-*.json

(`cntlora bench cost ...` is the same command.)

Peak memory is the extra over what was allocated before the init started (the model, the
batches): GPU max_memory_allocated on CUDA, the sampled resident set size (RSS) on the CPU.
`--summarize` gathers result files into bench/results/cost-summary.json and a scaling plot.
"""

from __future__ import annotations

import argparse

import torch

from cntlora.files import write_json
from cntlora.units import byte_size

from .inits import METHODS, MODELS
from .measure import benchmark, finish_partial
from .report import markdown_table, plot, summarize

EXAMPLES = "example:\n  cntlora bench cost --model smollm2 --device cpu --seqs 64 --seq-len 256 --r 16 --repeats 3"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the cost benchmark's options to `parser`."""
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


def run(args: argparse.Namespace) -> int:
    """Measure (measure.benchmark), or with --finish-partial / --summarize turn result files into medians / a summary.

    Returns:
        0.

    Raises:
        CNTLoRAError: an unknown model.
        OSError: a result file cannot be read or written.
    """
    for path in args.finish_partial or []:
        finish_partial(path)
        print(f"{path}: medians over the runs it finished")
    if args.finish_partial and not args.summarize:
        return 0
    if args.summarize:
        summary = summarize(args.summarize)
        write_json(args.summary_out, summary, indent=1)
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
