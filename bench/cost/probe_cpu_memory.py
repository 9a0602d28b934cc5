"""Where the CPU's resident memory goes while CNTLoRA collects statistics (SmolLM2, the cost
benchmark's data): the RSS sampled every 0.5 ms, its peak within each batch and its level
between batches, against the bytes of the running sums.

    python -m bench.cost.probe_cpu_memory [--stats-dtype float32]
"""

import argparse
import ctypes
import sys
import threading
import time

import psutil
import torch

import cntlora

from .inits import LINEAR_KINDS, build_model, calibration_batches


def main(argv=None) -> int:
    """Print the memory profile (see the module's docstring).

    Returns:
        0.
    """
    p = argparse.ArgumentParser(prog="python -m bench.cost.probe_cpu_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats-dtype", choices=["float32", "float64"], default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    proc, libc = psutil.Process(), ctypes.CDLL("libc.so.6")
    model, tokenizer = build_model("smollm2", torch.device("cpu"), torch.float32, 0)
    batches = calibration_batches("smollm2", tokenizer, model.config.vocab_size, 64, 256, 8, 0)
    with torch.no_grad():  # as the floor does before CNTLoRA in the benchmark
        for batch in batches[:2]:
            model(**batch)
    libc.malloc_trim(0)
    base = proc.memory_info().rss
    gib = lambda rss: (rss - base) / 2**30  # noqa: E731
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    levels, peaks = [], []

    def forward(model, batch):
        peaks.append(gib(peak[0]))
        levels.append(gib(proc.memory_info().rss))
        peak[0] = proc.memory_info().rss
        return model(**batch)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stats = cntlora.collect_statistics(model, batches, LINEAR_KINDS, progress=False, forward_fn=forward,
                                       stats_dtype=getattr(torch, a.stats_dtype) if a.stats_dtype else None)
    peaks.append(gib(peak[0]))
    done.set()
    sampler.join()
    after = gib(proc.memory_info().rss)
    libc.malloc_trim(0)
    print(f"sums: {stats.nbytes() / 2**30:.2f} GiB ({stats.info['stats_dtype']})")
    print("RSS above the start, GiB, before each batch:", " ".join(f"{x:.2f}" for x in levels))
    print("peak within each batch:", " ".join(f"{x:.2f}" for x in peaks[1:]))
    print(f"after the collection: {after:.2f}; after malloc_trim: {gib(proc.memory_info().rss):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
