"""CNTLoRA for diffusion denoisers (UNets and diffusion transformers, through diffusers).

Calibration turns clean (latent, conditioning) pairs into the inputs the denoiser sees in
training: the noisy sample at timesteps drawn from the training density, the timestep and
the conditioning. `initialize_denoiser` collects activation statistics over them and returns
the initialized peft.PeftModel; `save_diffusers_lora` writes it in diffusers' LoRA format,
which `pipeline.load_lora_weights` and `unet.load_lora_adapter` read without cntlora.
docs/diffusion.md walks through it.

Importing this package needs diffusers (`pip install 'cntlora[diffusion]'`); `import cntlora`
never imports it.
"""

from __future__ import annotations

from ..config import CNTLoRAError

try:
    import diffusers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise CNTLoRAError(
        "cntlora.diffusion needs diffusers; install it with pip install 'cntlora[diffusion]'"
    ) from error

from .calibration import RECIPES, DenoiserBatches, denoiser_forward, recipe_for, stack_images
from .initialize import initialize_denoiser
from .lora_format import save_diffusers_lora
from .pipeline import DenoiserData, encode_images, load_denoiser, load_denoiser_and_batches, read_images
from .targets import TARGET_SETS, cap_ranks, context_layers, effective_ranks, target_modules
from .timesteps import WEIGHTINGS, add_training_noise, sample_timesteps, timestep_quantiles, training_scheduler

__all__ = [
    "DenoiserBatches",
    "DenoiserData",
    "RECIPES",
    "TARGET_SETS",
    "WEIGHTINGS",
    "add_training_noise",
    "cap_ranks",
    "context_layers",
    "denoiser_forward",
    "effective_ranks",
    "encode_images",
    "initialize_denoiser",
    "load_denoiser",
    "load_denoiser_and_batches",
    "read_images",
    "recipe_for",
    "sample_timesteps",
    "save_diffusers_lora",
    "stack_images",
    "target_modules",
    "timestep_quantiles",
    "training_scheduler",
]
