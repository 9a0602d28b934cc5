"""initialize_denoiser: calibration batches -> statistics -> solve -> rank caps -> peft.PeftModel."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..apply import _timed, apply
from ..collect import iter_statistics
from ..config import CNTLoRAConfig, CNTLoRAError
from ..plan import solve_parts
from .calibration import DenoiserBatches, denoiser_forward, stack_images
from .pipeline import encode_images
from .targets import cap_ranks, context_layers, effective_ranks, target_modules


def _reference_pair(reference) -> Tuple[object, object]:
    if isinstance(reference, (list, tuple)) and len(reference) == 2:
        return reference[0], reference[1]
    raise CNTLoRAError("reference must be a pair (class_latents, class_conditioning); use None for no reference "
                       "(conditioning may be None inside the pair for an unconditional model)")


def initialize_denoiser(
    denoiser: nn.Module,
    latents: Union[torch.Tensor, Sequence[torch.Tensor]],
    conditioning=None,
    config: Optional[CNTLoRAConfig] = None,
    *,
    scheduler,
    reference=None,
    targets: Union[str, Sequence[str]] = "attention",
    timesteps_per_image: int = 4,
    weighting: Optional[str] = None,
    sampling: str = "stratified",
    batch_size: int = 8,
    seed: int = 0,
    cap_context_rank: bool = True,
    vae=None,
    lora_config=None,
    max_stats_memory: Optional[int] = None,
    stats_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    adapter_name: str = "default",
    **density,
):
    """Initialize LoRA adapters of a diffusion denoiser from a few (image, conditioning) pairs.

    The denoiser runs, frozen, on its training inputs: each clean latent noised at
    `timesteps_per_image` timesteps drawn from the training density (DenoiserBatches), with
    its conditioning. The statistics of the target layers' inputs are solved as
    cntlora.initialize solves them; then the layers that see only the conditioning
    (cross-attention to_k / to_v, add_k_proj / add_v_proj) get at most the effective rank of
    their inputs (targets.effective_rank), and the adapters are applied.

    Args:
        denoiser: a diffusers UNet2DConditionModel, UNet2DModel, SD3Transformer2DModel, ...
            (wrapped in place, as peft.get_peft_model does).
        latents: clean samples in the denoiser's input space, (N, C, H, W) or a list of
            (C, H, W): VAE latents times the scaling factor, or pixels in [-1, 1]; with
            `vae`, images in [-1, 1] that are encoded first.
        conditioning: prompt embeddings (N or 1, L, D), class labels, or a dict of the
            denoiser's conditioning arguments (SD3: encoder_hidden_states, pooled_projections).
        config: the CNTLoRAConfig (default CNTLoRAConfig()).
        scheduler: the pipeline's diffusers scheduler (DDPM-style or flow matching).
        reference: (class_latents, class_conditioning) for Cross / Shift (pre-training-like
            data, e.g. DreamBooth's class images), or None.
        targets: a target set of targets.TARGET_SETS or a list of module names.
        timesteps_per_image: noise levels per image (>= 1).
        weighting: the timestep density ("uniform", "logit_normal", "mode", "cosmap"); None:
            logit_normal for flow matching, uniform otherwise, as the training scripts.
        sampling: "stratified" (midpoint quantiles, the default) or "random".
        batch_size: samples per forward pass.
        seed: seeds timesteps and noise (the reference set uses seed + 1).
        cap_context_rank: cap the rank of conditioning-only layers at their inputs' effective rank.
        vae: the pipeline's VAE, to encode `latents` (and the reference's) from images
            (pipeline.encode_images); None when they are latents already.
        lora_config: a peft.LoraConfig for the options cntlora does not decide (dropout, ...).
        max_stats_memory, stats_dtype, progress: as in cntlora.initialize.
        adapter_name: the adapter's name.
        density: logit_mean, logit_std, mode_scale of the timestep density.

    Returns:
        The peft.PeftModel; `.cntlora_plan.stats_info` records the calibration and any rank caps.

    Raises:
        CNTLoRAError: bad latents or conditioning (wrong channels, mixed sizes, missing
            prompt embeddings), timesteps_per_image < 1, an unknown target set or weighting,
            or any error of cntlora.initialize.
    """
    config = config or CNTLoRAConfig()
    names = target_modules(denoiser, targets)
    if vae is not None:
        latents = encode_images(vae, stack_images(latents), seed)
    calibration = dict(scheduler=scheduler, timesteps_per_image=timesteps_per_image, weighting=weighting,
                       batch_size=batch_size, sampling=sampling, **density)
    batches = DenoiserBatches(denoiser, latents, conditioning, seed=seed, **calibration)
    reference_batches = None
    if reference is not None:
        reference_latents, reference_conditioning = _reference_pair(reference)
        if vae is not None:
            reference_latents = encode_images(vae, stack_images(reference_latents), seed + 1)
        reference_batches = DenoiserBatches(denoiser, reference_latents, reference_conditioning, seed=seed + 1,
                                            **calibration)
    context = [n for n in context_layers(denoiser) if n in set(names)] if cap_context_rank else []
    caps = {}
    seconds = [0.0]
    parts = _timed(iter_statistics(denoiser, batches, names, reference_dataloader=reference_batches,
                                   forward_fn=denoiser_forward, max_stats_memory=max_stats_memory,
                                   stats_dtype=stats_dtype, progress=progress), seconds)

    def measured():
        for part in parts:
            caps.update(effective_ranks(part, context, config.ridge))
            yield part
            del part

    plan = cap_ranks(solve_parts(denoiser, measured(), config, progress=progress, release=True), caps)
    plan.timings["collect"] = seconds[0]
    plan.stats_info["calibration"] = {
        "images": batches.count, "reference_images": reference_batches.count if reference_batches else 0,
        "timesteps_per_image": timesteps_per_image, "weighting": batches.weighting, "sampling": sampling,
        "scheduler": type(batches.scheduler).__name__, "seed": seed,
        "targets": targets if isinstance(targets, str) else list(targets),
        "context_ranks": dict(caps),
    }
    return apply(denoiser, plan, lora_config=lora_config, adapter_name=adapter_name)
