"""Every LoRA initialization the DreamBooth benchmark compares, on a diffusers denoiser.

A method label names an init and, for CNTLoRA, its setting:
- PEFT's inits: "default", "gaussian", "pissa_niter_4", "olora", "eva", "corda", "lora_ga",
  through bench.quality.baselines.peft_init (PEFT's public API);
- CNTLoRA: "cntlora-<self|cross|shift>[-vas][@item,...]". An item without "=" names where
  Cross and Shift take pre-training statistics from: "prior" (the class-prior images under
  the class prompt), "fashion" (a true sample of the pre-training set under its class
  prompts) or "weights" (the proxy built from W0). Items "key=value" are CNTLoRAConfig
  fields (ridge, gamma, base, strength, ...) or calibration knobs of
  cntlora.diffusion.initialize_denoiser: "tpi" (timesteps per image), "weighting" and
  "logit_mean"/"logit_std" (the timestep density), "cap_context_rank".

`init_adapters` initializes each requested (method, subject) once on a copy of the
denoiser and reads the adapter off it (dreambooth_stack.extract_adapter). CNTLoRA goes
through cntlora.diffusion.initialize_denoiser; the data-driven PEFT inits see the same
calibration batches (cntlora.diffusion.DenoiserBatches) with their regression targets.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from bench.quality.task import _parse_value as _value

from .dreambooth_stack import Adapter, extract_adapter

PEFT_METHODS = ["default", "gaussian", "pissa_niter_4", "olora", "eva", "corda", "lora_ga"]
SOURCES = ("prior", "fashion", "weights")
SEEDED = ("default", "gaussian", "pissa_niter_4")  # inits that draw random numbers: one init per seed
TARGET_SETS = ("attention", "attention+conv")  # cntlora.diffusion.target_modules' sets
# calibration knobs of cntlora.diffusion.initialize_denoiser a label may set
CALIBRATION_KEYS = {"tpi": int, "weighting": str, "logit_mean": float, "logit_std": float, "cap_context_rank": bool}
TIMESTEPS_PER_IMAGE = 4
CALIBRATION_BATCH = 64


def cntlora_labels(sources: Sequence[str] = SOURCES) -> List[str]:
    """The CNTLoRA settings the benchmark sweeps: Self, and Cross/Shift per source, each with and without VAS."""
    out = []
    for vas in ("", "-vas"):
        out.append(f"cntlora-self{vas}")
        out += [f"cntlora-{mode}{vas}@{src}" for mode in ("cross", "shift") for src in sources]
    return out


@dataclass(frozen=True)
class Method:
    label: str
    name: str  # a PEFT method, or "cntlora"
    config: tuple = ()  # CNTLoRAConfig fields, as sorted items
    source: Optional[str] = None
    calibration: tuple = ()  # initialize_denoiser's calibration knobs, as sorted items

    @property
    def is_cntlora(self) -> bool:
        return self.name == "cntlora"

    def stats_key(self) -> tuple:
        """What this method's statistics depend on (beyond the subject and target set)."""
        return (self.source if self.source != "weights" else None,) + self.calibration


def parse_method(label: str) -> Method:
    """'cntlora-cross-vas@prior,ridge=0.1' -> Method(name='cntlora', config=(mode, vas, ridge), source='prior')."""
    if label in PEFT_METHODS:
        return Method(label, label)
    head, _, rest = label.partition("@")
    parts = head.split("-")
    if len(parts) not in (2, 3) or parts[0] != "cntlora" or parts[1] not in ("self", "cross", "shift") \
            or (len(parts) == 3 and parts[2] != "vas"):
        raise ValueError(f"unknown method {label!r}; use one of {PEFT_METHODS} or cntlora-<self|cross|shift>[-vas][@...]")
    config = {"mode": parts[1], "vas": len(parts) == 3}
    source, calibration = None, {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            if key not in SOURCES:
                raise ValueError(f"unknown pre-training source {key!r} in {label!r}; use one of {SOURCES}")
            source = key
        elif key in CALIBRATION_KEYS:
            calibration[key] = CALIBRATION_KEYS[key](_value(value))
        else:
            config[key] = _value(value)
    if parts[1] != "self":
        source = source or "weights"
        config["pretrain_source"] = "weights" if source == "weights" else "reference"
    elif source is not None:
        raise ValueError(f"{label!r}: Self uses no pre-training statistics; drop @{source}")
    return Method(label, "cntlora", tuple(sorted(config.items())), source, tuple(sorted(calibration.items())))


def target_names(denoiser, target_set: str) -> List[str]:
    """Full module names of a target set (cntlora.diffusion.target_modules): "attention" (to_q, to_k,
    to_v, to_out.0) or "attention+conv" (those plus the ResNet 3×3 convs, conv shortcuts, proj_in/out)."""
    from cntlora.diffusion import target_modules

    if target_set not in TARGET_SETS:
        raise ValueError(f"unknown target set {target_set!r}; use one of {TARGET_SETS}")
    return target_modules(denoiser, target_set)


# -----------------------------------------------------------------------------
# denoiser batches: noisy images, timesteps, conditioning and the regression target


def forward(denoiser, batch: dict) -> torch.Tensor:
    """The denoiser's prediction for a batch (any "target" entry is left out of the call)."""
    from cntlora.diffusion import denoiser_forward

    return denoiser_forward(denoiser, {k: v for k, v in batch.items() if k != "target"})[0]


def loss(denoiser, batch: dict) -> torch.Tensor:
    return F.mse_loss(forward(denoiser, batch).float(), batch["target"].float())


def noisy_batch(scheduler, images, conditioning, noise, timesteps) -> dict:
    """The denoising problem for clean `images`: x_t, t, conditioning and the target (ε or v)."""
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction type {kind!r} is not supported; use epsilon or v_prediction")
    sample = scheduler.add_noise(images, noise, timesteps)
    target = noise if kind == "epsilon" else scheduler.get_velocity(images, noise, timesteps)
    return {"sample": sample, "timestep": timesteps, "encoder_hidden_states": conditioning, "target": target}


def calibration_batches(denoiser, scheduler, images, conditioning, seed: int = 0, **calibration) -> List[dict]:
    """The batches CNTLoRA's statistics come from (cntlora.diffusion.DenoiserBatches), with each
    sample's regression target added, for the data-driven PEFT inits (LoRA-GA needs a loss)."""
    from cntlora.diffusion import DenoiserBatches

    per_image = calibration.pop("tpi", TIMESTEPS_PER_IMAGE)
    calibration.pop("cap_context_rank", None)
    batches = DenoiserBatches(denoiser, images, conditioning, scheduler=scheduler, timesteps_per_image=per_image,
                              batch_size=CALIBRATION_BATCH, seed=seed, **calibration)
    if batches.scheduler.config.prediction_type != "epsilon":
        raise ValueError("the PEFT inits' calibration loss is written for epsilon prediction")
    out = []
    for b in range(len(batches)):
        batch = batches.batch(b)
        first = b * batches.batch_size
        noise = torch.stack([batches.noise(j) for j in range(first, first + batch["sample"].shape[0])])
        out.append({**batch, "target": noise.to(batch["sample"].device)})
    return out


# -----------------------------------------------------------------------------
# inits


def _weights(denoiser, names) -> Dict[str, torch.Tensor]:
    return {n: denoiser.get_submodule(n).weight.detach().clone() for n in names}


def _peft_adapter(method: Method, denoiser, names, r, alpha, batches, seed) -> Adapter:
    from bench.quality.baselines import peft_init

    torch.manual_seed(seed)
    model = copy.deepcopy(denoiser)
    t0 = time.perf_counter()
    peft_model = peft_init(method.name, model, {"target_modules": list(names), "r": r, "lora_alpha": alpha},
                           batches, forward_fn=forward, loss_fn=loss)
    seconds = time.perf_counter() - t0
    adapter = extract_adapter(peft_model, _weights(denoiser, names))
    adapter.init_seconds = seconds
    return adapter


def _cntlora_adapter(method: Method, data: "InitData", names, r, alpha, seed) -> Adapter:
    import cntlora
    from cntlora.diffusion import initialize_denoiser

    fields = dict(method.config)
    fields.update(r=r, alpha=float(alpha), seed=seed)
    calibration = dict(method.calibration)
    per_image = calibration.pop("tpi", TIMESTEPS_PER_IMAGE)
    reference = data.references[method.source]() if method.source in ("prior", "fashion") else None
    t0 = time.perf_counter()
    peft_model = initialize_denoiser(copy.deepcopy(data.denoiser), data.images, data.conditioning.unsqueeze(0),
                                     cntlora.CNTLoRAConfig.from_dict(fields), scheduler=data.scheduler,
                                     reference=reference, targets=list(names), timesteps_per_image=per_image,
                                     batch_size=CALIBRATION_BATCH, seed=seed, **calibration)
    seconds = time.perf_counter() - t0
    adapter = extract_adapter(peft_model, _weights(data.denoiser, names))
    adapter.init_seconds = seconds
    plan = peft_model.cntlora_plan
    adapter.info = {"ranks": {n: lp.rank for n, lp in plan.layers.items()},
                    "cap": {n: round(lp.cap, 4) for n, lp in plan.layers.items()},
                    "sigma1": {n: float(lp.singular_values[0]) if lp.singular_values.numel() else 0.0
                               for n, lp in plan.layers.items()}}
    return adapter


@dataclass
class InitData:
    """What an init may look at for one subject: its views and prompt, the references, the denoiser's parts."""

    denoiser: torch.nn.Module
    scheduler: object
    images: torch.Tensor  # the subject's training views
    conditioning: torch.Tensor  # (L, D), the instance prompt
    references: Dict[str, Callable[[], tuple]]  # source -> () -> (images, conditioning (1 or N, L, D))


def init_adapters(data: InitData, labels: Sequence[str], target_set: str, seeds: Sequence[int], r: int = 8,
                  alpha: float = 8.0, calib_seed: int = 0) -> Dict[tuple, object]:
    """Initialize every label for one subject; returns {(label, seed): Adapter or the error's text}.

    Inits that draw random numbers (SEEDED) run once per seed; the data-driven ones see the
    same calibration batches for every seed and run once (their adapter is shared).
    """
    names = target_names(data.denoiser, target_set)
    out: Dict[tuple, object] = {}
    peft_batches = None
    for label in labels:
        method = parse_method(label)
        run_seeds = list(seeds) if method.name in SEEDED else [None]
        for seed in run_seeds:
            try:
                if method.is_cntlora:
                    adapter = _cntlora_adapter(method, data, names, r, alpha, calib_seed)
                else:
                    if peft_batches is None:
                        peft_batches = calibration_batches(data.denoiser, data.scheduler, data.images,
                                                           data.conditioning.unsqueeze(0), calib_seed)
                    adapter = _peft_adapter(method, data.denoiser, names, r, alpha, peft_batches,
                                            0 if seed is None else seed)
            except Exception as err:  # an init PEFT cannot run on these layers: reported, not fatal
                adapter = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            for s in (seeds if seed is None else [seed]):
                out[(label, s)] = adapter
    return out
