"""Tiny diffusers models for the diffusion tests: built from configs, nothing downloaded."""

import json

import torch

CROSS_DIM = 16


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, norm_num_groups=4, attention_head_dim=2,
    ).eval()


def tiny_class_unet(seed=0, classes=5):
    """A class-conditional pixel-space UNet2DModel."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=classes,
    ).eval()


def tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=CROSS_DIM, caption_projection_dim=8, pooled_projection_dim=12, out_channels=4,
    ).eval()


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    ).eval()


def write_tokenizer_files(folder):
    """A character-level CLIP vocabulary with a few merges, written into `folder`."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    merges = ["s k", "sk s</w>", "d o", "do g</w>"]
    tokens += ["sk", "sks</w>", "do", "dog</w>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(tokens)


def tiny_text_encoder(folder, seed=0):
    """(tokenizer, CLIPTextModel) with a vocabulary written into `folder`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=CROSS_DIM)
    return tokenizer, CLIPTextModel(config).eval()


def tiny_pipeline(folder, seed=0):
    """A StableDiffusionPipeline of tiny parts, saved to folder/'pipeline'; returns (pipeline, its folder)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tokenizer, text_encoder = tiny_text_encoder(folder / "vocab", seed)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(unet=tiny_unet(seed), vae=tiny_vae(seed), text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = folder / "pipeline"
    pipe.save_pretrained(out)
    return pipe, out


def write_images(folder, count=2, size=16, seed=0, sizes=None):
    """`count` random RGB PNGs in `folder` (sizes: one (w, h) per image, else size × size)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        w, h = sizes[i] if sizes else (size, size)
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def latents(count=3, channels=4, size=8, seed=0):
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_embeddings(count=1, tokens=5, seed=1):
    return torch.randn(count, tokens, CROSS_DIM, generator=torch.Generator().manual_seed(seed))
