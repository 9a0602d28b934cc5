"""Timing a loop that runs on a GPU without making it wait."""

from __future__ import annotations

import time
from typing import Dict, List

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the phase timings are true (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Per-phase times of a loop that must not wait for the GPU: CUDA events between the
    phases (read once at the end), wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: List[tuple] = []
        self.last = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        """The time since the previous mark goes to `phase`."""
        now = self._now()
        self.spans.append((phase, self.last, now))
        self.last = now

    def totals(self) -> Dict[str, float]:
        if self.cuda:
            self.last.synchronize()
        out: Dict[str, float] = {}
        for phase, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1000 if self.cuda else end - start
            out[phase] = out.get(phase, 0.0) + seconds
        return out
