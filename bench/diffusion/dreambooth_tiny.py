"""A tiny, randomly initialised stand-in for the benchmark's artifacts, for fast CPU checks.

`make_tiny_artifacts(folder)` writes the files `assets` reads (denoiser, encoder, subjects)
with a small UNet of the same family, so the whole DreamBooth pipeline runs end to end in
seconds. Its numbers mean nothing; its structure is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import assets, data, models, tokens

TINY_DIM = 16


def tiny_unet_config() -> dict:
    cfg = models.unet_config()
    cfg.update(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TINY_DIM, attention_head_dim=4,
               norm_num_groups=4)
    return cfg


def make_tiny_artifacts(folder, subjects: int = 2, train_views: int = 3, heldout_views: int = 4, seed: int = 0,
                        unet_config: dict | None = None) -> Path:
    """Write tiny random artifacts into `folder` (created); returns it. `unet_config` replaces the tiny UNet's."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = models.build_unet(unet_config or tiny_unet_config())
    table = models.build_token_table(unet.config.cross_attention_dim)
    assets.save_base(unet, table, DDPMScheduler(**models.scheduler_config()), folder)
    enc = models.FidelityEncoder(width=8, proj_dim=8)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(folder / "encoder.safetensors"))
    (folder / "encoder_config.json").write_text(json.dumps(enc.config))
    g = torch.Generator().manual_seed(seed)
    manifest, tensors = [], {}
    for i in range(subjects):
        label = (3 * i) % 10
        name = f"{tokens.RARE_TOKENS[i]}-{tokens.CLASS_NAMES[label]}"
        image = torch.rand(1, 32, 32, generator=g) * 2 - 1
        tp = data.random_aug_params(train_views, g)
        hp = data.random_aug_params(heldout_views, g)
        tensors.update({f"{name}.image": image, f"{name}.train_params": tp, f"{name}.heldout_params": hp,
                        f"{name}.train_views": data.augment(image.expand(train_views, -1, -1, -1), tp).contiguous(),
                        f"{name}.heldout_views": data.augment(image.expand(heldout_views, -1, -1, -1), hp).contiguous()})
        manifest.append({"name": name, "token": tokens.RARE_TOKENS[i], "label": label,
                         "class_name": tokens.CLASS_NAMES[label], "test_index": i})
    save_file(tensors, str(folder / "subjects.safetensors"))
    (folder / "subjects.json").write_text(json.dumps({"subjects": manifest}))
    return folder
