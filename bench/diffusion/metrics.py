"""What the DreamBooth benchmark measures, for K runs at once, and how it compares methods.

- Denoising loss on fixed (noise, timestep) draws of a subject's training, validation and
  test views, the same draws for every method and seed.
- Subject fidelity: the mean cosine, in the fidelity encoder's space, between samples for the
  instance prompt and the held-out real views (validation views pick the lr, test views report).
- Prior drift: for the class prompt and for other classes' prompts, 1 − cosine between each
  sample and the base model's sample from the same initial noise, and their pixel MSE.
- Steps to target: the first checkpoint at which a method's mean fidelity reaches default
  LoRA's final mean fidelity.
- Paired differences over (subject, seed) pairs, with 95% t-intervals, and Holm's correction
  (the quality benchmark's statistics).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

try:
    from bench.quality.stats import holm, mean_std, paired_difference
except ImportError:  # the statistics' earlier home
    from cntlora.bench.quality import holm, mean_std, paired_difference

__all__ = ["holm", "mean_std", "paired_difference", "ddim", "sample", "embed", "fidelity", "drift",
           "steps_to_target", "pair_key", "compare"]


def pair_key(subject: str, seed: int) -> str:
    return f"{subject}:{seed}"


def ddim(scheduler):
    """A deterministic DDIM sampler (η = 0) on the denoiser's training schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)


@torch.no_grad()
def sample(predict, sampler, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
           guidance: float) -> torch.Tensor:
    """Classifier-free-guided DDIM samples for K runs at once.

    predict(x, t, encoder_hidden_states) -> the denoiser's output. noise: (K, n, C, H, W) initial noise, run-major; cond: (K, n, L, D) each sample's prompt;
    uncond: (L, D), the null prompt. Run k's conditional and unconditional passes both go
    through its slice of the batch, so a stacked denoiser samples every run with its own
    adapter. Returns (K, n, C, H, W).
    """
    k, n = noise.shape[:2]
    sampler.set_timesteps(steps)
    x = noise.reshape(k * n, *noise.shape[2:]) * sampler.init_noise_sigma
    enc = torch.cat([cond, uncond.expand_as(cond)], dim=1).reshape(k * 2 * n, *cond.shape[2:])
    for t in sampler.timesteps:
        inp = sampler.scale_model_input(torch.cat([x.reshape(k, n, *x.shape[1:])] * 2, dim=1), t)
        inp = inp.reshape(k * 2 * n, *x.shape[1:])
        out = predict(inp, t.to(inp.device).expand(inp.shape[0]), enc)
        out = out.reshape(k, 2, n, *x.shape[1:])
        eps = out[:, 1] + guidance * (out[:, 0] - out[:, 1])
        x = sampler.step(eps.reshape(k * n, *x.shape[1:]), t, x).prev_sample
    return x.reshape(noise.shape).clamp(-1, 1)


@torch.no_grad()
def embed(encoder, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Unit-norm encoder features of (..., C, H, W) images, shape (..., D)."""
    flat = images.reshape(-1, *images.shape[-3:])
    feats = torch.cat([encoder(flat[i : i + chunk]).float() for i in range(0, flat.shape[0], chunk)])
    feats = torch.nn.functional.normalize(feats, dim=-1)
    return feats.reshape(*images.shape[:-3], feats.shape[-1])


def fidelity(sample_feats: torch.Tensor, view_feats: Sequence[torch.Tensor]) -> List[float]:
    """Per run: mean cosine between its samples (K, n, D) and its subject's real views ((v, D) each)."""
    return [float((sample_feats[k] @ view_feats[k].T).mean()) for k in range(sample_feats.shape[0])]


def drift(samples: torch.Tensor, base: torch.Tensor, sample_feats: torch.Tensor, base_feats: torch.Tensor) -> Dict[str, List[float]]:
    """Per run: mean 1 − cosine(sample, base sample from the same noise) and mean pixel MSE; inputs (K, n, ...)."""
    cos = (sample_feats * base_feats).sum(-1)  # (K, n)
    mse = (samples.float() - base.float()).pow(2).flatten(2).mean(-1)
    return {"drift": (1 - cos).mean(1).tolist(), "mse": mse.mean(1).tolist()}


def steps_to_target(curve: Dict[int, float], target: float) -> Optional[int]:
    """The first checkpoint (> 0) whose value reaches `target`, or None."""
    hits = [s for s, v in sorted(curve.items()) if s > 0 and v >= target]
    return hits[0] if hits else None


def compare(by_pair: Dict[str, Dict[str, float]], label: str, others: Sequence[str], higher_is_better: bool = True,
            correct: bool = True) -> Dict[str, dict]:
    """`label` against each of `others` over their shared (subject, seed) pairs, with Holm-adjusted p.

    by_pair: {method: {pair key: value}}. Returns {other: paired difference (mean, ci95, p,
    p_holm, verdict)}; an other with fewer than two shared pairs is left out.
    """
    out = {}
    for other in others:
        if other == label or other not in by_pair or label not in by_pair:
            continue
        d = paired_difference(by_pair[label], by_pair[other], higher_is_better)
        if d is not None:
            out[other] = d
    if correct and out:
        adjusted = holm({k: v["p"] for k, v in out.items()})
        for k, v in out.items():
            v["p_holm"] = adjusted[k]
    return out
