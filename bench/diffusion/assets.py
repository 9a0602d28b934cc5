"""Loaders for the Fashion-MNIST DreamBooth setting: denoiser, prompts, encoder, subjects.

The artifacts live in ``bench/diffusion/artifacts/`` (made by ``pretrain``, ``encoder``
and ``subjects`` in this package):

* ``denoiser.safetensors`` (fp16): the UNet's weights under ``unet.*`` and the prompt
  token table under ``token_table.weight``; ``unet_config.json`` and
  ``scheduler_config.json`` beside it.
* ``encoder.safetensors`` (fp16) and ``encoder_config.json``: the fidelity encoder.
* ``subjects.safetensors`` and ``subjects.json``: the subjects, their views and tokens.

Everything runs on the CPU as well as on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data, models, tokens

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DEFAULT_GUIDANCE = 1.5


def _root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else ARTIFACTS


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with the scripts in bench/diffusion")
    return json.loads(path.read_text())


def save_base(unet, token_table: nn.Embedding, scheduler, out: str | Path, metadata: dict | None = None) -> Path:
    """Write the denoiser in fp16 with its two configs, as ``load_base`` reads it.

    Args:
        unet: the ``UNet2DConditionModel``.
        token_table: the prompt-token ``nn.Embedding``.
        scheduler: the ``DDPMScheduler`` it was trained with.
        out: the folder to write into (created if needed).
        metadata: optional string-valued facts stored in the safetensors header.

    Returns:
        The path of ``denoiser.safetensors``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in unet.state_dict().items()}
    tensors["token_table.weight"] = token_table.weight.detach().to("cpu", torch.float16).contiguous()
    meta = {"format": "pt", "vocab": json.dumps(list(tokens.VOCAB)),
            "context_length": str(tokens.CONTEXT_LENGTH)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = out / "denoiser.safetensors"
    save_file(tensors, str(path), metadata=meta)
    (out / "unet_config.json").write_text(json.dumps(_plain(unet.config), indent=2) + "\n")
    (out / "scheduler_config.json").write_text(json.dumps(_plain(scheduler.config), indent=2) + "\n")
    return path


def _plain(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def load_base(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              root: str | Path | None = None):
    """The pre-trained denoiser, its prompt-token table and its noise schedule.

    Args:
        device: where to put the modules.
        dtype: their parameter dtype (the file holds fp16; fp32 is the safe choice to train).
        root: the artifact folder; ``bench/diffusion/artifacts`` by default.

    Returns:
        ``(unet, token_table, scheduler)``: a ``UNet2DConditionModel`` in eval mode, an
        ``nn.Embedding`` of ``len(tokens.VOCAB)`` rows, and the ``DDPMScheduler`` used in
        pre-training (1000 steps, epsilon prediction). Gradients are left enabled.

    Raises:
        FileNotFoundError: when the artifacts are missing.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    root = _root(root)
    unet = UNet2DConditionModel.from_config(_read_json(root / "unet_config.json"))
    scheduler = DDPMScheduler.from_config(_read_json(root / "scheduler_config.json"))
    path = root / "denoiser.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with `python -m bench.diffusion.pretrain`")
    state = load_file(str(path))
    table_w = state.pop("token_table.weight")
    unet.load_state_dict({k[len("unet."):]: v.float() for k, v in state.items()}, strict=True)
    table = nn.Embedding(*table_w.shape)
    with torch.no_grad():
        table.weight.copy_(table_w.float())
    unet.to(device).eval()
    table.to(device)
    if dtype != torch.float32:
        unet.to(dtype)
        table.to(dtype)
    return unet, table, scheduler


def _is_single_prompt(prompts) -> bool:
    return len(prompts) == 0 or all(isinstance(t, (str, int)) for t in prompts)


def encode_prompt(token_table: nn.Embedding, tokens_: Sequence | torch.Tensor) -> torch.Tensor:
    """Cross-attention inputs for one prompt or a batch of prompts.

    Args:
        token_table: the prompt-token ``nn.Embedding``.
        tokens_: one prompt (token names or ids, e.g. ``["sks", "dress"]``; ``[]`` is the
            unconditional prompt), a list of such prompts, or an int tensor of ids of shape
            (L,) or (B, L). Lists are padded with ``null`` to ``tokens.CONTEXT_LENGTH``;
            tensors are used as given.

    Returns:
        ``encoder_hidden_states`` of shape (B, L, D) on the table's device and dtype
        (B = 1 for a single prompt).

    Raises:
        KeyError, ValueError: for unknown tokens or prompts that are too long.
    """
    dev = token_table.weight.device
    if isinstance(tokens_, torch.Tensor):
        ids = tokens_.long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
    elif _is_single_prompt(tokens_):
        ids = tokens.batch_ids([tokens_])
    else:
        ids = tokens.batch_ids(tokens_)
    return token_table(ids.to(dev))


@torch.no_grad()
def sample_images(unet, token_table: nn.Embedding, scheduler, prompt_tokens: Sequence, n: int, seed: int,
                  steps: int = 50, guidance: float = DEFAULT_GUIDANCE, batch_size: int = 256,
                  eta: float = 0.0) -> torch.Tensor:
    """Sample images with DDIM and classifier-free guidance, deterministic per seed.

    The starting noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)``, so a
    seed gives the same noise on every device; with ``eta=0`` nothing else is random.
    Guidance mixes ``eps = eps_null + guidance * (eps_prompt - eps_null)``; ``guidance=1``
    runs the conditional pass alone.

    Args:
        unet: the denoiser (any device and dtype; its first parameter decides).
        token_table: the prompt-token table (on the UNet's device).
        scheduler: the training scheduler; DDIM is built from its config.
        prompt_tokens: one prompt for all images (e.g. ``["sks", "dress"]``), or a list of
            ``n`` prompts, one per image.
        n: number of images.
        seed: the noise seed.
        steps: DDIM steps.
        guidance: the classifier-free guidance scale.
        batch_size: images per denoiser call (the guided pass doubles it).
        eta: DDIM's noise scale; 0 is deterministic.

    Returns:
        float32 images (n, 1, 32, 32) on the CPU, clipped to [-1, 1].

    Raises:
        ValueError: when a per-image prompt list does not have ``n`` entries.
    """
    from diffusers import DDIMScheduler

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    if _is_single_prompt(prompt_tokens):
        cond_all = encode_prompt(token_table, prompt_tokens).expand(n, -1, -1)
    else:
        if len(prompt_tokens) != n:
            raise ValueError(f"{len(prompt_tokens)} prompts for {n} images")
        cond_all = encode_prompt(token_table, prompt_tokens)
    uncond = encode_prompt(token_table, [])
    size = unet.config.sample_size
    noise = torch.randn(n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=device).manual_seed(seed) if eta > 0 else None
    out = []
    for start in range(0, n, batch_size):
        x = noise[start:start + batch_size].to(device)
        k = x.shape[0]
        cond = cond_all[start:start + k].to(dtype)
        if guidance != 1.0:
            context = torch.cat([uncond.expand(k, -1, -1).to(dtype), cond])
        for t in ddim.timesteps:
            if guidance == 1.0:
                eps = unet(x.to(dtype), t, encoder_hidden_states=cond).sample.float()
            else:
                both = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context).sample.float()
                e_null, e_cond = both.chunk(2)
                eps = e_null + guidance * (e_cond - e_null)
            x = ddim.step(eps, t, x, eta=eta, generator=gen).prev_sample
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def noisy_batch(images: torch.Tensor, labels: torch.Tensor, scheduler, token_table: nn.Embedding, seed: int,
                cfg_drop: float = 0.1) -> dict:
    """Denoiser inputs drawn as in pre-training: uniform timesteps, Gaussian noise, class
    prompts dropped to the null prompt with probability ``cfg_drop``.

    Args:
        images: clean images (B, 1, 32, 32) in [-1, 1].
        labels: their classes (B,).
        scheduler: the training ``DDPMScheduler``.
        token_table: the prompt-token table.
        seed: seed of the CPU generator that draws timesteps, noise and drops.
        cfg_drop: probability of the unconditional prompt.

    Returns:
        A dict with ``sample`` (noisy images), ``timestep`` (B,), ``encoder_hidden_states``
        (B, L, D), ``noise`` (the target) and ``ids`` (B, L), on the images' device.
    """
    g = torch.Generator().manual_seed(seed)
    b = images.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    drop = torch.rand(b, generator=g) < cfg_drop
    ids = tokens.class_ids(labels.cpu(), drop)
    dev = images.device
    noise, t = noise.to(dev, images.dtype), t.to(dev)
    return {"sample": scheduler.add_noise(images, noise, t), "timestep": t, "noise": noise, "ids": ids.to(dev),
            "encoder_hidden_states": encode_prompt(token_table, ids)}


def fashion_sample(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform random sample (without replacement) of the Fashion-MNIST split.

    Args:
        n: how many images.
        seed: the permutation's seed.
        split: ``"train"`` (the pre-training set) or ``"test"``.

    Returns:
        ``(images, labels)``: float32 (n, 1, 32, 32) in [-1, 1] and int64 (n,), on the CPU.

    Raises:
        ValueError: when n exceeds the split's size.
    """
    images, labels = data.load_fashion_mnist(split)
    if n > len(labels):
        raise ValueError(f"n={n} exceeds the {len(labels)} images of the {split} split")
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return data.to_model_space(images[idx]), labels[idx]


def load_encoder(device: str | torch.device = "cpu", root: str | Path | None = None) -> models.FidelityEncoder:
    """The fidelity encoder, frozen, in eval mode, fp32.

    ``encoder(images)`` maps (N, 1, 32, 32) images in [-1, 1] to unit-norm embeddings; the
    cosine similarity of two embeddings scores whether they show the same item.

    Args:
        device: where to put it.
        root: the artifact folder; ``bench/diffusion/artifacts`` by default.

    Returns:
        The ``models.FidelityEncoder``.

    Raises:
        FileNotFoundError: when the artifacts are missing.
    """
    from safetensors.torch import load_file

    root = _root(root)
    cfg = _read_json(root / "encoder_config.json")
    enc = models.FidelityEncoder(width=cfg["width"], proj_dim=cfg["proj_dim"], embedding=cfg["embedding"])
    path = root / "encoder.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with `python -m bench.diffusion.encoder`")
    enc.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return enc.to(device).eval().requires_grad_(False)


@dataclass
class Subject:
    """One subject: a single Fashion-MNIST test item bound to a rare token.

    Attributes:
        name: short identifier, e.g. ``"sks-dress"``.
        token: its rare token.
        label: its class index.
        class_name: its class token.
        test_index: its index in the Fashion-MNIST test split.
        image: the item itself (1, 32, 32) in [-1, 1].
        train_views: the views to fine-tune on (K, 1, 32, 32).
        heldout_views: further views for scoring only (M, 1, 32, 32).
        train_params: augmentation rows (K, 5) that made ``train_views`` from ``image``.
        heldout_params: augmentation rows (M, 5) that made ``heldout_views``.
    """

    name: str
    token: str
    label: int
    class_name: str
    test_index: int
    image: torch.Tensor
    train_views: torch.Tensor
    heldout_views: torch.Tensor
    train_params: torch.Tensor = field(repr=False)
    heldout_params: torch.Tensor = field(repr=False)

    @property
    def prompt(self) -> list[str]:
        """The subject prompt, e.g. ``["sks", "dress"]``."""
        return [self.token, self.class_name]

    @property
    def class_prompt(self) -> list[str]:
        """The class prompt for prior preservation, e.g. ``["dress"]``."""
        return [self.class_name]


def load_subjects(root: str | Path | None = None) -> list[Subject]:
    """The benchmark's subjects, in manifest order.

    Args:
        root: the artifact folder; ``bench/diffusion/artifacts`` by default.

    Returns:
        A list of ``Subject`` (tensors float32 on the CPU).

    Raises:
        FileNotFoundError: when the artifacts are missing.
    """
    from safetensors.torch import load_file

    root = _root(root)
    manifest = _read_json(root / "subjects.json")
    path = root / "subjects.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with `python -m bench.diffusion.subjects`")
    t = load_file(str(path))
    out = []
    for i, s in enumerate(manifest["subjects"]):
        key = s["name"]
        out.append(Subject(
            name=key, token=s["token"], label=s["label"], class_name=s["class_name"], test_index=s["test_index"],
            image=t[f"{key}.image"].float(), train_views=t[f"{key}.train_views"].float(),
            heldout_views=t[f"{key}.heldout_views"].float(),
            train_params=t[f"{key}.train_params"].float(), heldout_params=t[f"{key}.heldout_params"].float()))
    return out
