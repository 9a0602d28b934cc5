"""Calibration batches for denoisers: clean latents + conditioning -> the denoiser's training inputs.

Each image gets `timesteps_per_image` noise levels (timesteps.sample_timesteps); a batch is a
dict keyed by the denoiser's own argument names (the noisy sample, "timestep" and the
conditioning), so one forward, `denoiser_forward`, serves every denoiser: model(**batch).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import CNTLoRAError
from .timesteps import _noisy, check_per_image, default_weighting, sample_timesteps, training_scheduler


@dataclass(frozen=True)
class Recipe:
    """How a denoiser class is called in training.

    sample: the argument that takes the noisy input ("sample" or "hidden_states").
    required: conditioning arguments the model cannot run without.
    tensor_as: the argument a bare tensor (or int) `conditioning` fills; None when the model
        needs a dict of conditioning arguments.
    width: the config key giving the width of encoder_hidden_states, checked when present.
    """

    sample: str
    required: Tuple[str, ...] = ()
    tensor_as: Optional[str] = None
    width: Optional[str] = None


RECIPES: Dict[str, Recipe] = {
    # Stable Diffusion-style UNets: sample, timestep, encoder_hidden_states (SDXL adds added_cond_kwargs)
    "UNet2DConditionModel": Recipe("sample", ("encoder_hidden_states",), "encoder_hidden_states",
                                   "cross_attention_dim"),
    # pixel- or latent-space UNets: class-conditional (class_labels); recipe_for drops it when unconditional
    "UNet2DModel": Recipe("sample", ("class_labels",), "class_labels"),
    # SD3: hidden_states, timestep, encoder_hidden_states, pooled_projections
    "SD3Transformer2DModel": Recipe("hidden_states", ("encoder_hidden_states", "pooled_projections"), None,
                                    "joint_attention_dim"),
    # DiT: class-conditional transformer
    "DiTTransformer2DModel": Recipe("hidden_states", ("class_labels",), "class_labels"),
}


def _base(denoiser: nn.Module) -> nn.Module:
    """The diffusers model inside a peft.PeftModel, or the model itself."""
    return denoiser.get_base_model() if hasattr(denoiser, "get_base_model") else denoiser


def recipe_for(denoiser: nn.Module) -> Recipe:
    """The calling convention of `denoiser` in training.

    Args:
        denoiser: a diffusers denoiser (or a peft.PeftModel around one).

    Returns:
        The Recipe of its class (RECIPES); a class-conditional UNet2DModel requires
        class_labels. Other classes are read from their forward signature and take a dict
        of conditioning arguments.

    Raises:
        CNTLoRAError: the forward takes neither `sample` nor `hidden_states`, or no `timestep`.
    """
    model = _base(denoiser)
    name = type(model).__name__
    recipe = RECIPES.get(name)
    config = getattr(model, "config", {})
    if name == "UNet2DModel":
        conditional = config.get("num_class_embeds") or config.get("class_embed_type")
        return Recipe("sample", ("class_labels",), "class_labels") if conditional else Recipe("sample")
    if recipe is not None:
        return recipe
    params = inspect.signature(model.forward).parameters
    sample = next((p for p in ("sample", "hidden_states") if p in params), None)
    if sample is None or "timestep" not in params:
        raise CNTLoRAError(
            f"{name}.forward takes no sample/hidden_states and timestep; cntlora.diffusion calibrates diffusers "
            f"denoisers ({', '.join(RECIPES)}); for others call cntlora.initialize with your own forward_fn"
        )
    return Recipe(sample)


def denoiser_forward(model: nn.Module, batch: Mapping):
    """The forward_fn for calibration batches: model(**batch, return_dict=False).

    Args:
        model: the denoiser (or a peft.PeftModel around it).
        batch: a dict keyed by the denoiser's argument names (DenoiserBatches yields them).

    Returns:
        The model's output tuple.
    """
    return model(**batch, return_dict=False)


def stack_images(samples) -> torch.Tensor:
    """Images or latents as one (N, C, H, W) tensor.

    Args:
        samples: a (N, C, H, W) tensor or a sequence of (C, H, W) / (1, C, H, W) tensors.

    Returns:
        The stacked tensor.

    Raises:
        CNTLoRAError: no samples, mixed sizes, or not 4-D floating point.
    """
    if isinstance(samples, (list, tuple)):
        if not samples:
            raise CNTLoRAError("no images or latents were given; pass at least one")
        shapes = {tuple(x.shape[-3:]) for x in samples}
        if len(shapes) > 1:
            raise CNTLoRAError(
                f"the images or latents have mixed sizes {sorted(shapes)}; resize them to one size (e.g. "
                "load_denoiser_and_batches(..., resolution=512)) or initialize from each size separately"
            )
        samples = torch.cat([x.reshape(1, *x.shape[-3:]) for x in samples])
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or len(samples) == 0:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise CNTLoRAError(f"images or latents must be a non-empty (N, C, H, W) tensor, got {shape}")
    if not samples.is_floating_point():
        raise CNTLoRAError(f"images or latents must be floating point, got {samples.dtype}")
    return samples


def stack_latents(latents, denoiser: nn.Module) -> torch.Tensor:
    """stack_images, checked against the denoiser's input channels.

    Args:
        latents: what stack_images takes.
        denoiser: the denoiser they are for.

    Returns:
        The stacked tensor.

    Raises:
        CNTLoRAError: what stack_images raises, or a channel count other than the
            denoiser's in_channels.
    """
    latents = stack_images(latents)
    expected = _base(denoiser).config.get("in_channels")
    if expected is not None and latents.shape[1] != expected:
        raise CNTLoRAError(
            f"the latents have {latents.shape[1]} channels but {type(_base(denoiser)).__name__} takes {expected}; "
            "encode images with the pipeline's VAE first (initialize_denoiser(..., vae=pipeline.vae) or "
            "load_denoiser_and_batches do), or pass samples in the denoiser's input space"
        )
    return latents


def _rows(value, count: int, name: str):
    """Check that every tensor in `value` has first dimension `count` or 1 (broadcast)."""
    if isinstance(value, Mapping):
        return {k: _rows(v, count, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] not in (1, count):
        raise CNTLoRAError(
            f"conditioning {name} has {value.shape[0]} rows for {count} images; give one row per image, or one "
            "row for all"
        )
    return value


def _take(value, rows: torch.Tensor, count: int):
    """The rows of one batch: tensors with `count` rows are indexed, 1-row tensors repeated."""
    if isinstance(value, Mapping):
        return {k: _take(v, rows, count) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[rows.to(value.device)] if value.shape[0] == count else value.expand(len(rows), *value.shape[1:])
    return value


def conditioning_kwargs(recipe: Recipe, conditioning, count: int, denoiser: nn.Module) -> dict:
    """The conditioning as the denoiser's keyword arguments, checked.

    Args:
        recipe: the denoiser's Recipe.
        conditioning: None, a tensor or int (filling recipe.tensor_as), or a dict of the
            denoiser's conditioning arguments; tensors have one row per image or one row.
        count: the number of images.
        denoiser: the denoiser (its config gives the expected embedding width).

    Returns:
        A dict of keyword arguments with `count` or 1 rows each.

    Raises:
        CNTLoRAError: a required argument is missing, a tensor where a dict is needed, the
            wrong number of rows or the wrong embedding width.
    """
    if conditioning is None:
        kwargs = {}
    elif isinstance(conditioning, Mapping):
        kwargs = dict(conditioning)
    elif recipe.tensor_as is None and not recipe.required:
        raise CNTLoRAError(f"{type(_base(denoiser)).__name__} is unconditional; pass conditioning=None")
    elif recipe.tensor_as is None:
        raise CNTLoRAError(
            f"{type(_base(denoiser)).__name__} takes {', '.join(recipe.required)}; pass conditioning as a dict "
            "with those keys"
        )
    else:
        kwargs = {recipe.tensor_as: conditioning}
    labels = kwargs.get("class_labels")
    if isinstance(labels, (int, list, tuple)):
        kwargs["class_labels"] = torch.tensor(labels if isinstance(labels, (list, tuple)) else [labels])
    missing = [k for k in recipe.required if kwargs.get(k) is None]
    if missing:
        what = "prompt embeddings from the pipeline's text encoder" if "encoder_hidden_states" in missing else "them"
        raise CNTLoRAError(
            f"{type(_base(denoiser)).__name__} needs conditioning {missing}; pass {what} as conditioning= "
            "(load_denoiser_and_batches encodes a prompt)"
        )
    width = _base(denoiser).config.get(recipe.width) if recipe.width else None
    states = kwargs.get("encoder_hidden_states")
    if isinstance(width, int) and isinstance(states, torch.Tensor) and states.shape[-1] != width:
        raise CNTLoRAError(
            f"the prompt embeddings have width {states.shape[-1]} but the denoiser's {recipe.width} is {width}; "
            "encode the prompt with the pipeline's own text encoder"
        )
    return _rows(kwargs, count, "")


def _cast(value, dtype: torch.dtype):
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


class DenoiserBatches:
    """Calibration batches for a denoiser: a re-iterable sequence of dicts, identical on every pass.

    Sample j = i·K + k is image i at its k-th timestep (K = timesteps_per_image); its noise
    comes from a generator seeded by (seed, j), so passes and reruns give the same inputs.

    Args:
        denoiser: the diffusers denoiser.
        latents: clean samples in the denoiser's input space (VAE latents times the scaling
            factor for latent diffusion, pixels in [-1, 1] for pixel-space models): a
            (N, C, H, W) tensor or a list of (C, H, W) tensors.
        conditioning: see conditioning_kwargs (prompt embeddings, class labels, or a dict).
        scheduler: the pipeline's diffusers scheduler (training_scheduler explains its use).
        timesteps_per_image: K >= 1.
        weighting: the timestep density (timesteps.WEIGHTINGS); None: training's default.
        batch_size: samples per batch.
        seed: seeds the timesteps and the noise.
        sampling: "stratified" or "random" (sample_timesteps).
        density: logit_mean, logit_std, mode_scale for the density.

    Raises:
        CNTLoRAError: bad latents, conditioning, timesteps_per_image, batch_size or scheduler.
    """

    def __init__(self, denoiser: nn.Module, latents: Union[torch.Tensor, Sequence[torch.Tensor]], conditioning=None,
                 scheduler=None, timesteps_per_image: int = 4, weighting: Optional[str] = None, batch_size: int = 8,
                 seed: int = 0, sampling: str = "stratified", **density):
        check_per_image(timesteps_per_image)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise CNTLoRAError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.recipe = recipe_for(denoiser)
        self.latents = stack_latents(latents, denoiser)
        self.count = len(self.latents)
        self.conditioning = conditioning_kwargs(self.recipe, conditioning, self.count, denoiser)
        self.scheduler = training_scheduler(scheduler)
        self.weighting = weighting or default_weighting(self.scheduler)
        self.per_image, self.batch_size, self.seed = timesteps_per_image, batch_size, seed
        self.indices = sample_timesteps(self.scheduler, self.count, timesteps_per_image, self.weighting, seed,
                                        sampling, **density)
        self.dtype = _model_dtype(denoiser)

    def __len__(self) -> int:
        return math.ceil(self.count * self.per_image / self.batch_size)

    def noise(self, j: int) -> torch.Tensor:
        """The standard normal noise of sample j (CPU, float32)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + j) % 2**63)
        return torch.randn(tuple(self.latents.shape[1:]), generator=generator)

    def batch(self, b: int) -> dict:
        """Batch b: the noisy samples, their timesteps and their conditioning."""
        if not 0 <= b < len(self):
            raise IndexError(b)
        samples = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.count * self.per_image))
        images, slots = samples // self.per_image, samples % self.per_image
        noise = torch.stack([self.noise(int(j)) for j in samples])
        noisy, timesteps = _noisy(self.scheduler, self.latents[images.to(self.latents.device)],
                                  self.indices[images, slots], noise)
        conditioning = _cast(_take(self.conditioning, images, self.count), self.dtype)
        return {self.recipe.sample: noisy.to(self.dtype), "timestep": timesteps, **conditioning}

    def __getitem__(self, b: int) -> dict:
        return self.batch(b)

    def __iter__(self):
        for b in range(len(self)):
            yield self.batch(b)
