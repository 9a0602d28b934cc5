"""From folders on disk to what initialize_denoiser takes: a denoiser, latents, conditioning, a scheduler.

A model folder is either a diffusers pipeline folder (model_index.json, as
StableDiffusionPipeline.save_pretrained writes it: prompts go through its tokenizer and text
encoder, images through its VAE) or a bare denoiser folder (config.json naming a diffusers
model class; its scheduler comes from a sibling `scheduler` folder or a scheduler_config.json
beside it, and images enter the denoiser as pixels in [-1, 1]).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CNTLoRAError
from .calibration import recipe_for
from .lora_format import default_prefix

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class DenoiserData:
    """What initialize_denoiser needs, loaded from folders.

    denoiser: the diffusers denoiser (UNet or transformer), in eval mode.
    scheduler: the pipeline's scheduler.
    latents: (N, C, H, W) clean samples in the denoiser's input space.
    conditioning: prompt embeddings (1, L, D) or None.
    reference: (class_latents, class_conditioning) or None.
    prefix: the key prefix of its diffusers LoRA file ("unet" or "transformer").
    """

    denoiser: nn.Module
    scheduler: object
    latents: torch.Tensor
    conditioning: Optional[torch.Tensor]
    reference: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]
    prefix: str


def read_images(folder: Union[str, os.PathLike], resolution: Optional[int] = None) -> torch.Tensor:
    """Every image in a folder as a float tensor (N, 3, H, W) in [-1, 1], in file-name order.

    Args:
        folder: a folder of .png / .jpg / .jpeg / .webp / .bmp files.
        resolution: None keeps the images' own size (they must all have one size); an int
            resizes the shorter side to it and center-crops a square, as diffusers' training
            scripts do.

    Returns:
        The images.

    Raises:
        CNTLoRAError: the folder is missing or holds no image, or (resolution None) the
            images have mixed sizes.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise CNTLoRAError(f"{folder} is not a folder; pass a folder of images")
    files = image_files(folder)
    if not files:
        raise CNTLoRAError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some, or pass another folder")
    images = []
    for path in files:
        with Image.open(path) as image:
            x = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            x = x.reshape(image.height, image.width, 3).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)
        if resolution is not None:
            h, w = x.shape[-2:]
            scale = resolution / min(h, w)
            size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            x = x[..., top:top + resolution, left:left + resolution]
        images.append(x)
    sizes = sorted({tuple(x.shape[-2:]) for x in images})
    if len(sizes) > 1:
        raise CNTLoRAError(f"the images in {folder} have mixed sizes {sizes}; resize them to one size, or pass "
                           "resolution= (--resolution) to resize and center-crop them")
    return torch.cat(images)


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _load_scheduler(folder: Path):
    import diffusers

    for candidate in (folder.parent / "scheduler", folder):
        path = candidate / "scheduler_config.json"
        if path.is_file():
            cls = getattr(diffusers, json.loads(path.read_text()).get("_class_name", ""), None)
            if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
                return cls.from_pretrained(candidate)
    raise CNTLoRAError(f"found no scheduler for {folder}; pass the whole pipeline folder, or put the training "
                       "scheduler's scheduler_config.json beside the denoiser")


def load_denoiser(model_dir: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The denoiser alone, from a pipeline folder (its unet or transformer) or a bare denoiser folder.

    Args:
        model_dir: a diffusers pipeline folder or model folder.
        dtype: the dtype to load in (default: as saved).

    Returns:
        The denoiser, in eval mode (e.g. the base for cntlora.load_adapter).

    Raises:
        CNTLoRAError: the folder is neither, or its pipeline has no unet or transformer.
    """
    import diffusers

    folder, subfolder = Path(model_dir), None
    if _is_pipeline(folder):
        index = json.loads((folder / "model_index.json").read_text())
        subfolder = next((k for k in ("unet", "transformer") if isinstance(index.get(k), list)), None)
        if subfolder is None:
            raise CNTLoRAError(f"the pipeline in {folder} has no unet or transformer to adapt")
        name = index[subfolder][1]
    else:
        config_path = folder / "config.json"
        name = json.loads(config_path.read_text()).get("_class_name", "") if config_path.is_file() else ""
    cls = getattr(diffusers, name, None) if name else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise CNTLoRAError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a diffusers "
                           "model folder (config.json with _class_name); pass one of those")
    return cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype).eval()


def _prompt_encoder(pipe, folder: Path):
    """encode(prompt) -> embeddings (1, L, D) through the pipeline's tokenizer and text encoder."""
    tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or encoder is None:
        return None
    if getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "unet", None) is None:
        raise CNTLoRAError(
            f"{type(pipe).__name__} encodes prompts with several text encoders; cntlora's folder loader takes "
            "Stable Diffusion 1/2-style pipelines. Compute the conditioning with pipeline.encode_prompt and call "
            "cntlora.diffusion.initialize_denoiser"
        )

    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids.to(encoder.device))[0].detach()

    return encode


def encode_images(vae, images: torch.Tensor, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """Latents as diffusers' training scripts feed them to the denoiser.

    Args:
        vae: the pipeline's AutoencoderKL (or another VAE whose encode gives a latent_dist).
        images: (N, 3, H, W) in [-1, 1].
        seed: seeds the posterior samples.
        batch_size: images per encoder call.

    Returns:
        float32 latents: a seeded sample of the VAE's posterior, minus the config's
        shift_factor (if any), times its scaling_factor.
    """
    scaling = vae.config.get("scaling_factor", 1.0)
    shift = vae.config.get("shift_factor") or 0.0
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            latents = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator)
            out.append((latents - shift) * scaling)
    return torch.cat(out).float()


def load_denoiser_and_batches(
    model_dir: Union[str, os.PathLike],
    images_dir: Union[str, os.PathLike],
    prompt: Optional[str] = None,
    reference_dir: Union[str, os.PathLike, None] = None,
    class_prompt: Optional[str] = None,
    *,
    resolution: Optional[int] = None,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> DenoiserData:
    """Load a denoiser and encode the calibration images and prompts for initialize_denoiser.

    Args:
        model_dir: a diffusers pipeline folder (model_index.json; Stable Diffusion 1/2-style when
            prompts are given) or a bare denoiser folder.
        images_dir: a folder of the fine-tuning images.
        prompt: the instance prompt (e.g. "a photo of sks dog"); needed by text-conditioned
            denoisers, refused by models without a text encoder.
        reference_dir: a folder of reference images (DreamBooth's class images) for Cross /
            Shift, or None.
        class_prompt: the reference images' prompt (e.g. "a photo of a dog").
        resolution: resize and center-crop every image to this size (read_images); None keeps
            their size, which must then be one size.
        seed: seeds the VAE posterior samples (seed + 1 for the reference images).
        device, dtype: where and in which dtype to load the models (default: CPU, saved dtype).

    Returns:
        A DenoiserData; pass it on as initialize_denoiser(data.denoiser, data.latents,
        data.conditioning, config, scheduler=data.scheduler, reference=data.reference).

    Raises:
        CNTLoRAError: an unknown folder layout, a prompt for a model without a text encoder, a
            text-conditioned model without a prompt, a reference folder without a class prompt
            (or the reverse), an empty or missing image folder, mixed image sizes, or latents
            whose channels do not fit the denoiser.
    """
    folder = Path(model_dir)
    if reference_dir is None and class_prompt is not None:
        raise CNTLoRAError("class_prompt (--class-prompt) describes the reference images; add reference_dir "
                           "(--reference) or leave the class prompt out")
    pipe = None
    if _is_pipeline(folder):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None:
            raise CNTLoRAError(f"the pipeline in {folder} has no unet or transformer to adapt")
        scheduler, vae = pipe.scheduler, getattr(pipe, "vae", None)
        encode_prompt = _prompt_encoder(pipe, folder)
    else:
        denoiser = load_denoiser(folder, dtype)
        scheduler, vae, encode_prompt = _load_scheduler(folder), None, None
    if device is not None:
        for module in (denoiser, vae, getattr(pipe, "text_encoder", None)):
            if module is not None:
                module.to(device)
    denoiser.eval()
    needs_text = "encoder_hidden_states" in recipe_for(denoiser).required
    if prompt is not None and encode_prompt is None:
        raise CNTLoRAError(f"a prompt was given but {folder} has no text encoder ({type(denoiser).__name__} alone); "
                           "pass a pipeline folder with tokenizer and text_encoder, or leave the prompt out")
    if needs_text and prompt is None:
        raise CNTLoRAError(f"{type(denoiser).__name__} is text-conditioned; pass the instance prompt (--prompt), "
                           "e.g. 'a photo of sks dog'")
    if reference_dir is not None and needs_text and class_prompt is None:
        raise CNTLoRAError("the reference images need their prompt: pass class_prompt (--class-prompt), e.g. "
                           "'a photo of a dog'")
    def encode(folder, offset):
        images = read_images(folder, resolution)
        return encode_images(vae, images, seed + offset) if vae is not None else images

    latents = encode(images_dir, 0)
    conditioning = encode_prompt(prompt) if prompt is not None else None
    reference = None
    if reference_dir is not None:
        reference_latents = encode(reference_dir, 1)  # seed + 1, as initialize_denoiser's reference
        reference = (reference_latents, encode_prompt(class_prompt) if class_prompt is not None else None)
    return DenoiserData(denoiser, scheduler, latents, conditioning, reference, default_prefix(denoiser))


def image_files(folder: Union[str, os.PathLike]) -> List[Path]:
    """The image files read_images reads, in its order."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
