"""Timesteps and noise as diffusers' training scripts draw them, made deterministic.

SD-style (DDPM) training draws t uniformly from the training schedule and noises with
`scheduler.add_noise`; SD3/Flux-style flow matching draws u from a density on (0, 1), takes
the schedule index floor(u·T) and interpolates x_t = (1 - σ)·x0 + σ·noise. Here every image
gets `per_image` timesteps, one from each of `per_image` equal-probability blocks of the
density (stratified quantiles), so the statistics are a quadrature of the training
distribution, and the same seed gives the same draw.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Tuple

import torch

from ..config import CNTLoRAError

# The densities of diffusers' compute_density_for_timestep_sampling: "uniform" (SD-style; its
# "none"), "logit_normal" and "mode", plus "cosmap", the density that diffusers' uniform draw
# with the cosmap loss weighting amounts to (SD3 paper, eq. 20).
WEIGHTINGS = ("uniform", "logit_normal", "mode", "cosmap")
SAMPLINGS = ("stratified", "random")


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` belongs to the flow-matching family (FlowMatchEulerDiscreteScheduler & co)."""
    return "FlowMatch" in type(scheduler).__name__


def training_scheduler(scheduler):
    """The scheduler a training script builds from a pipeline's scheduler config.

    Args:
        scheduler: any diffusers scheduler (the pipeline's own, e.g. PNDMScheduler for SD 1.5).

    Returns:
        A fresh FlowMatchEulerDiscreteScheduler for flow-matching schedulers, else a
        DDPMScheduler, both from `scheduler.config` (so inference-time set_timesteps calls
        on the original do not leak in).

    Raises:
        CNTLoRAError: `scheduler` is None or not a diffusers scheduler.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if scheduler is None or getattr(scheduler, "config", None) is None:
        raise CNTLoRAError(
            "pass scheduler= the pipeline's diffusers scheduler (e.g. DDPMScheduler.from_pretrained(model_dir, "
            "subfolder='scheduler')); its config fixes the noise levels the denoiser was trained on"
        )
    target = FlowMatchEulerDiscreteScheduler if is_flow_matching(scheduler) else DDPMScheduler
    known = set(inspect.signature(target.__init__).parameters)
    return target.from_config({k: v for k, v in dict(scheduler.config).items() if k in known or k.startswith("_")})


def default_weighting(scheduler) -> str:
    """The density training scripts use: logit-normal for flow matching, uniform otherwise."""
    return "logit_normal" if is_flow_matching(scheduler) else "uniform"


def timestep_quantiles(levels: torch.Tensor, weighting: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29) -> torch.Tensor:
    """Map probability levels q in (0, 1) through the timestep density's quantile function.

    Args:
        levels: probabilities in (0, 1), any shape.
        weighting: one of WEIGHTINGS.
        logit_mean, logit_std: the logit-normal density's parameters (diffusers' defaults 0, 1).
        mode_scale: the "mode" density's scale (diffusers' default 1.29).

    Returns:
        u in (0, 1), float64, the same shape: the value a uniform draw q becomes in
        diffusers' compute_density_for_timestep_sampling (for "cosmap": the SD3 paper's map).

    Raises:
        CNTLoRAError: an unknown weighting.
    """
    q = levels.double()
    if weighting == "uniform":
        return q
    if weighting == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(q))
    if weighting == "mode":
        return 1 - q - mode_scale * (torch.cos(math.pi * q / 2) ** 2 - 1 + q)
    if weighting == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * q / 2) + 1)
    raise CNTLoRAError(f"unknown weighting {weighting!r}; use one of {', '.join(map(repr, WEIGHTINGS))}")


def _random_draw(count: int, weighting: str, generator: torch.Generator, **density) -> torch.Tensor:
    """i.i.d. draws through diffusers' own sampler."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = {"uniform": "none", "cosmap": "none"}.get(weighting, weighting)
    u = compute_density_for_timestep_sampling(scheme, count, generator=generator, **density).double()
    return timestep_quantiles(u, "cosmap") if weighting == "cosmap" else u


def check_per_image(per_image) -> None:
    if not isinstance(per_image, int) or isinstance(per_image, bool) or per_image < 1:
        raise CNTLoRAError(
            f"timesteps_per_image must be a positive integer, got {per_image!r}; each image needs at least one "
            "noise level (4 is a good start)"
        )


def sample_timesteps(scheduler, n_images: int, per_image: int, weighting: Optional[str] = None, seed: int = 0,
                     sampling: str = "stratified", logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29) -> torch.Tensor:
    """Indices into the training schedule, `per_image` per image, drawn as training draws them.

    Args:
        scheduler: a diffusers scheduler (see training_scheduler).
        n_images: how many images.
        per_image: timesteps per image (>= 1).
        weighting: the timestep density, one of WEIGHTINGS; None picks training's default
            (logit_normal for flow matching, uniform otherwise).
        seed: seeds the draw.
        sampling: "stratified": the n_images·per_image draws are the midpoint quantiles of the
            density, image i getting one from each of `per_image` equal-probability blocks
            (which one: a seeded permutation); "random": i.i.d. draws from diffusers'
            compute_density_for_timestep_sampling with a seeded generator.
        logit_mean, logit_std, mode_scale: the density's parameters (timestep_quantiles).

    Returns:
        A LongTensor (n_images, per_image) of schedule indices in [0, T) with T =
        num_train_timesteps: the DDPM timestep itself, or the index into the flow-matching
        scheduler's timesteps and sigmas (as diffusers' SD3 training script uses them).

    Raises:
        CNTLoRAError: per_image < 1, n_images < 1, an unknown weighting or sampling.
    """
    check_per_image(per_image)
    if not isinstance(n_images, int) or n_images < 1:
        raise CNTLoRAError(f"need at least one image, got {n_images!r}")
    scheduler = training_scheduler(scheduler)
    weighting = weighting or default_weighting(scheduler)
    if weighting not in WEIGHTINGS:
        raise CNTLoRAError(f"unknown weighting {weighting!r}; use one of {', '.join(map(repr, WEIGHTINGS))}")
    density = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    generator = torch.Generator().manual_seed(seed)
    if sampling == "stratified":
        blocks = torch.arange(per_image, dtype=torch.float64).unsqueeze(0) * n_images  # 1 × K
        within = torch.stack([torch.randperm(n_images, generator=generator) for _ in range(per_image)], 1)  # N × K
        levels = (blocks + within.double() + 0.5) / (n_images * per_image)
        u = timestep_quantiles(levels, weighting, **density)
    elif sampling == "random":
        u = _random_draw(n_images * per_image, weighting, generator, **density).reshape(n_images, per_image)
    else:
        raise CNTLoRAError(f"unknown sampling {sampling!r}; use one of {', '.join(map(repr, SAMPLINGS))}")
    steps = int(scheduler.config.num_train_timesteps)
    return (u * steps).long().clamp_(0, steps - 1)


def add_training_noise(scheduler, latents: torch.Tensor, indices: torch.Tensor, noise: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The noisy input and the timestep the denoiser sees in training.

    Args:
        scheduler: a diffusers scheduler (see training_scheduler).
        latents: clean samples x0, (B, C, H, W).
        indices: (B,) schedule indices from sample_timesteps.
        noise: (B, C, H, W) standard normal noise.

    Returns:
        (noisy float32, timestep): DDPM-style: scheduler.add_noise(x0, noise, t) with the
        integer t; flow matching: (1 - σ)·x0 + σ·noise with σ = sigmas[index] and the float
        timestep timesteps[index].
    """
    return _noisy(training_scheduler(scheduler), latents, indices, noise)


def _noisy(scheduler, latents: torch.Tensor, indices: torch.Tensor, noise: torch.Tensor):
    """add_training_noise for a scheduler that training_scheduler already made."""
    x0, noise, indices = latents.float(), noise.float().to(latents.device), indices.long().cpu()
    if is_flow_matching(scheduler):
        sigma = scheduler.sigmas[indices].float().to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - sigma) * x0 + sigma * noise, scheduler.timesteps[indices].float().to(x0.device)
    timesteps = indices.to(x0.device)
    return scheduler.add_noise(x0, noise, timesteps), timesteps
