"""cntlora.diffusion: calibration of denoisers, targets, rank caps, diffusers' LoRA format, folder loading."""

import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

import cntlora  # noqa: E402
from cntlora import CNTLoRAConfig, CNTLoRAError  # noqa: E402
from cntlora.diffusion import (DenoiserBatches, context_layers, denoiser_forward, initialize_denoiser,  # noqa: E402
                               load_denoiser, load_denoiser_and_batches, read_images, sample_timesteps,
                               save_diffusers_lora, target_modules, timestep_quantiles)
from cntlora.layers import layer_spec, weight_matrix  # noqa: E402

from diffusion_helpers import (latents, prompt_embeddings, tiny_class_unet, tiny_pipeline, tiny_sd3,  # noqa: E402
                               tiny_unet, write_images)

pytestmark = pytest.mark.usefixtures("one_thread")
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ATTN0 = "down_blocks.0.attentions.0.transformer_blocks.0"


def run(model, batch):
    with torch.no_grad():
        return denoiser_forward(model, batch)[0]


def sd3_conditioning(count=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(count, 5, 16, generator=g),
            "pooled_projections": torch.randn(count, 12, generator=g)}


# --------------------------------------------------------------------------- timesteps


def test_quantiles_follow_diffusers_densities():
    """Stratified quantiles against diffusers' own sampler (and cosmap against its loss weighting)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    levels = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for scheme, kwargs in [("logit_normal", dict(logit_mean=0.3, logit_std=0.8)), ("mode", dict(mode_scale=1.29))]:
        draws = compute_density_for_timestep_sampling(scheme, 40000, generator=torch.Generator().manual_seed(0),
                                                      **{**dict(logit_mean=0.0, logit_std=1.0, mode_scale=1.29),
                                                         **kwargs}).double()
        ours = timestep_quantiles(levels, scheme, **kwargs)
        empirical = torch.quantile(draws, levels) if scheme == "logit_normal" else torch.quantile(draws, 1 - levels)
        assert (ours - empirical).abs().max() < 0.01, scheme
    # cosmap: a uniform draw weighted by diffusers' cosmap loss weighting is the cosmap density
    grid = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    weighted = (compute_loss_weighting_for_sd3("cosmap", sigmas=grid) * grid**2).mean()
    stratified = timestep_quantiles((torch.arange(4000, dtype=torch.float64) + 0.5) / 4000, "cosmap").pow(2).mean()
    assert abs(float(weighted) - float(stratified)) < 1e-4


def test_stratified_timesteps_are_midpoint_quantiles():
    scheduler = DDPMScheduler()
    n, k = 5, 4
    table = sample_timesteps(scheduler, n, k, seed=3)
    assert torch.equal(table, sample_timesteps(scheduler, n, k, seed=3))
    assert not torch.equal(table, sample_timesteps(scheduler, n, k, seed=4))
    levels = (torch.arange(n * k, dtype=torch.float64) + 0.5) / (n * k)
    assert torch.equal(table.flatten().sort().values, (levels * 1000).long())  # uniform: t = floor(q·T)
    assert torch.equal(table.sort(0).values.T.flatten(), (levels * 1000).long())  # one per block, per image
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    got = sample_timesteps(flow, 1, 3, seed=0).flatten()
    want = (torch.sigmoid(torch.special.ndtri(torch.tensor([1 / 6, 3 / 6, 5 / 6], dtype=torch.float64))) * 1000).long()
    assert torch.equal(got, want)  # flow matching defaults to the logit-normal density


def test_noise_follows_the_training_formulas():
    x = latents(2)
    ddpm = DenoiserBatches(tiny_unet(), x, prompt_embeddings(), DDPMScheduler(**SD), timesteps_per_image=2,
                           batch_size=4)
    batch = ddpm.batch(0)
    alpha_bar = DDPMScheduler(**SD).alphas_cumprod
    for j in range(4):
        t = int(batch["timestep"][j])
        want = alpha_bar[t].sqrt() * x[j // 2] + (1 - alpha_bar[t]).sqrt() * ddpm.noise(j)
        assert torch.allclose(batch["sample"][j], want, atol=1e-6)
    flow = DenoiserBatches(tiny_sd3(), x, sd3_conditioning(), FlowMatchEulerDiscreteScheduler(shift=3.0),
                           timesteps_per_image=2, batch_size=4)
    batch = flow.batch(0)
    for j in range(4):
        plain = (1000 - int(flow.indices[j // 2, j % 2])) / 1000
        sigma = 3 * plain / (1 + 2 * plain)
        assert abs(float(batch["timestep"][j]) - 1000 * sigma) < 1e-2
        want = (1 - sigma) * x[j // 2] + sigma * flow.noise(j)
        assert torch.allclose(batch["hidden_states"][j], want, atol=1e-5)
    assert batch["pooled_projections"].shape == (4, 12)


def test_sampler_statistics_are_the_mixture_of_per_timestep_statistics():
    """Collected over the sampler's batches = the average of single (image, timestep) statistics."""
    unet = tiny_unet()
    x, cond = latents(2), prompt_embeddings(2)
    names = [f"{ATTN0}.attn1.to_q", "down_blocks.0.resnets.0.conv1"]
    batches = DenoiserBatches(unet, x, cond, DDPMScheduler(**SD), timesteps_per_image=3, batch_size=4, seed=5)
    mixed = cntlora.collect_statistics(unet, batches, names, forward_fn=denoiser_forward, progress=False)
    alpha_bar = DDPMScheduler(**SD).alphas_cumprod
    singles = []
    for j in range(6):
        i, t = j // 3, int(batches.indices[j // 3, j % 3])
        noisy = alpha_bar[t].sqrt() * x[i] + (1 - alpha_bar[t]).sqrt() * batches.noise(j)
        one = [{"sample": noisy[None], "timestep": torch.tensor([t]), "encoder_hidden_states": cond[i:i + 1]}]
        singles.append(cntlora.collect_statistics(unet, one, names, forward_fn=denoiser_forward, progress=False))
    for name in names:
        got = mixed.moments(name)
        parts = [s.moments(name) for s in singles]
        weights = torch.tensor([p.count for p in parts], dtype=torch.float64) / got.count
        assert sum(p.count for p in parts) == got.count
        assert torch.allclose(got.mean, sum(w * p.mean for w, p in zip(weights, parts)), rtol=1e-5, atol=1e-7)
        assert torch.allclose(got.second, sum(w * p.second for w, p in zip(weights, parts)), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the solve


def _captured_rows(model, batches, names):
    """Raw layer inputs from the test's own hooks: tokens for Linear, unfolded patches for Conv2d."""
    modules = dict(model.named_modules())
    rows = {n: [] for n in names}

    def hook(name):
        def pre(module, args):
            x = args[0].detach().double()
            if isinstance(module, torch.nn.Conv2d):
                patches = F.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)
                rows[name].append(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
            else:
                rows[name].append(x.reshape(-1, x.shape[-1]))
        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    for batch in batches:
        run(model, batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def test_delta_matches_least_squares_on_patches_and_attention_inputs():
    unet = tiny_unet()
    names = ["down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv_shortcut", f"{ATTN0}.attn1.to_q",
             f"{ATTN0}.attn2.to_k"]
    x, cond = latents(3), prompt_embeddings(3, tokens=12)
    calibration = dict(scheduler=DDPMScheduler(**SD), timesteps_per_image=2, batch_size=4, seed=1)
    raw = _captured_rows(unet, DenoiserBatches(unet, x, cond, **calibration), names)
    w0 = {n: weight_matrix(m, layer_spec(n, m)).detach().double()
          for n, m in unet.named_modules() if n in names}
    config = CNTLoRAConfig(r=8, alpha=4.0, base="keep", strength=None, ridge=1e-2)
    peft_model = initialize_denoiser(unet, x, cond, config, targets=names, **calibration)
    plan = peft_model.cntlora_plan
    for name in names:
        rows, w = raw[name], w0[name]
        n = rows.shape[1]
        lam = 1e-2 * torch.trace(rows.T @ rows / len(rows)) / n
        system = torch.cat([rows / len(rows) ** 0.5, lam.sqrt() * torch.eye(n, dtype=torch.float64)])
        target = torch.cat([rows @ w.T / len(rows) ** 0.5, torch.zeros(n, w.shape[0], dtype=torch.float64)])
        want = torch.linalg.lstsq(system, target, driver="gelsd").solution.T
        lp = plan.layers[name]
        got = plan.scale * lp.B.double() @ lp.A.double()
        assert lp.rank == min(w.shape) == 8
        assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-4, name


@pytest.mark.parametrize("base", ["subspace", "residual"])
@pytest.mark.parametrize("kind", ["unet", "class_unet", "sd3"])
def test_output_unchanged_at_step_zero(kind, base):
    scheduler = FlowMatchEulerDiscreteScheduler() if kind == "sd3" else DDPMScheduler()
    if kind == "unet":
        model, x, cond, targets = tiny_unet(), latents(2), prompt_embeddings(), "all"
    elif kind == "class_unet":
        model, x, cond, targets = tiny_class_unet(), latents(2, 3), torch.tensor([1, 4]), "attention+conv"
    else:
        model, x, cond, targets = tiny_sd3(), latents(2), sd3_conditioning(), "attention+ff"
    probe = DenoiserBatches(model, x, cond, scheduler, timesteps_per_image=2, seed=9).batch(0)
    before = run(model, probe)
    peft_model = initialize_denoiser(model, x, cond, CNTLoRAConfig(r=4, alpha=8.0, base=base), scheduler=scheduler,
                                     targets=targets, timesteps_per_image=2)
    assert torch.allclose(run(peft_model, probe), before, atol=1e-5)
    if base == "residual":
        assert any(lp.B.abs().max() > 0 for lp in peft_model.cntlora_plan.layers.values())


def test_target_sets():
    unet = tiny_unet()
    attention = target_modules(unet)
    assert len(attention) == 4 * 2 * 4 and f"{ATTN0}.attn2.to_out.0" in attention
    conv = target_modules(unet, "attention+conv")
    assert "down_blocks.0.resnets.0.conv1" in conv and "up_blocks.1.resnets.0.conv_shortcut" in conv
    assert "down_blocks.0.attentions.0.proj_in" in conv and "conv_in" not in conv and "conv_out" not in conv
    assert f"{ATTN0}.ff.net.0.proj" in target_modules(unet, "attention+ff")
    assert context_layers(unet) == [f"{p}.attn2.{k}" for p in (ATTN0, "up_blocks.1.attentions.0.transformer_blocks.0",
                                                               "up_blocks.1.attentions.1.transformer_blocks.0",
                                                               "mid_block.attentions.0.transformer_blocks.0")
                                    for k in ("to_k", "to_v")]
    sd3 = target_modules(tiny_sd3(), "all")
    assert "transformer_blocks.0.attn.add_k_proj" in sd3 and "transformer_blocks.0.attn.to_add_out" in sd3
    assert "transformer_blocks.1.ff.net.2" in sd3 and "proj_out" not in sd3
    assert target_modules(unet, ["attn2.to_k"]) == context_layers(unet)[::2]
    with pytest.raises(CNTLoRAError, match="unknown targets"):
        target_modules(unet, "convs")


# --------------------------------------------------------------------------- cross-attention of one prompt


def test_nearly_rank_one_cross_attention_is_capped():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(4)
    direction = torch.randn(16, generator=g)
    cond = (direction + 1e-4 * torch.randn(1, 6, 16, generator=g))  # one prompt, six nearly equal tokens
    x = latents(2)
    kv = f"{ATTN0}.attn2.to_k"
    config = CNTLoRAConfig(r=4, alpha=8.0)
    capped = initialize_denoiser(tiny_unet(), x, cond, config, scheduler=DDPMScheduler()).cntlora_plan
    assert all(capped.layers[n].rank == 1 for n in context_layers(unet))
    assert capped.layers[f"{ATTN0}.attn1.to_k"].rank == 4 and capped.layers[f"{ATTN0}.attn2.to_q"].rank == 4
    assert capped.stats_info["rank_caps"][kv] == [4, 1]
    row = capped.layers[kv].A[0].double()
    assert abs(float(row @ direction.double())) / (row.norm() * direction.norm()) > 0.999  # the prompt's direction
    loose = initialize_denoiser(tiny_unet(), x, cond, config, scheduler=DDPMScheduler(),
                                cap_context_rank=False).cntlora_plan
    dead = loose.layers[kv].A[1:].double() @ direction.double()
    assert loose.layers[kv].rank == 4 and dead.abs().max() < 1e-3 * loose.layers[kv].A[1:].norm()
    # exactly rank one, with a reference prompt of its own (Cross and Shift): finite, capped at two
    for mode in ("cross", "shift"):
        ref = (latents(2, seed=7), torch.randn(1, 1, 16, generator=g).expand(1, 6, 16))
        config = CNTLoRAConfig(r=4, mode=mode, base="keep")
        plan = initialize_denoiser(tiny_unet(), x, direction.expand(1, 6, 16), config, scheduler=DDPMScheduler(),
                                   reference=ref).cntlora_plan
        assert plan.layers[kv].rank == 2 and all(torch.isfinite(lp.B).all() for lp in plan.layers.values())


# --------------------------------------------------------------------------- diffusers' LoRA format


@contextmanager
def cntlora_hidden():
    """Every `import cntlora...` fails inside: what runs here cannot use cntlora (it patches nothing)."""
    saved = {k: v for k, v in sys.modules.items() if k == "cntlora" or k.startswith("cntlora.")}
    sys.modules.update({k: None for k in saved})
    try:
        yield
    finally:
        sys.modules.update(saved)


def test_diffusers_loaders_reproduce_the_adapters_without_cntlora(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusionPipeline, UNet2DConditionModel

    pipe, pipeline_dir = tiny_pipeline(tmp_path)
    x, cond = latents(2), prompt_embeddings()
    probe = DenoiserBatches(pipe.unet, x, cond, pipe.scheduler, timesteps_per_image=2, seed=9).batch(0)
    want = {}
    for base in ("keep", "residual"):
        unet = tiny_unet()  # the pipeline's UNet, fresh
        config = CNTLoRAConfig(r=4, alpha=16.0, base=base, strength=None)
        peft_model = initialize_denoiser(unet, x, cond, config, scheduler=pipe.scheduler, targets="attention+conv")
        with torch.no_grad():  # as if trained: B and A move off their initial values
            for module in peft_model.modules():
                if hasattr(module, "lora_B") and "default" in module.lora_B:
                    module.lora_B["default"].weight.add_(0.05)
        save_diffusers_lora(peft_model, tmp_path / base)
        want[base] = run(peft_model, probe)
        assert not torch.allclose(want[base], run(tiny_unet(), probe), atol=1e-3)  # the adapter does something
    sd3 = tiny_sd3()
    sd3.save_pretrained(tmp_path / "sd3")
    sd3_probe = DenoiserBatches(sd3, x, sd3_conditioning(), FlowMatchEulerDiscreteScheduler(), seed=9).batch(0)
    sd3_model = initialize_denoiser(sd3, x, sd3_conditioning(), CNTLoRAConfig(r=4, alpha=2.0, base="keep"),
                                    scheduler=FlowMatchEulerDiscreteScheduler(), targets="all")
    save_diffusers_lora(sd3_model, tmp_path / "sd3_lora")
    want["sd3"] = run(sd3_model, sd3_probe)
    with cntlora_hidden():
        got = {}
        for base in ("keep", "residual"):
            unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
            unet.load_lora_adapter(str(tmp_path / base), prefix="unet", use_safetensors=True)
            got[f"unet/{base}"] = run(unet, probe)
        loaded = StableDiffusionPipeline.from_pretrained(pipeline_dir)
        loaded.load_lora_weights(str(tmp_path / "residual"))
        got["pipeline/residual"] = run(loaded.unet, probe)
        transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "sd3")
        transformer.load_lora_adapter(str(tmp_path / "sd3_lora"), use_safetensors=True)
        got["sd3"] = run(transformer, sd3_probe)
    for key, value in got.items():
        assert torch.allclose(value, want[key.split("/")[-1]], atol=1e-5), key


def test_metadata_is_what_keeps_the_scale(tmp_path):
    from safetensors.torch import load_file

    x, cond = latents(2), prompt_embeddings()
    peft_model = initialize_denoiser(tiny_unet(), x, cond, CNTLoRAConfig(r=4, alpha=16.0, base="keep"),
                                     scheduler=DDPMScheduler())
    save_diffusers_lora(peft_model, tmp_path / "lora")
    probe = DenoiserBatches(tiny_unet(), x, cond, DDPMScheduler(), seed=9).batch(0)
    want = run(peft_model, probe)
    with_metadata = tiny_unet()
    with_metadata.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", use_safetensors=True)
    assert torch.allclose(run(with_metadata, probe), want, atol=1e-5)
    bare = tiny_unet()  # the same tensors, no metadata: diffusers takes alpha = rank, scale 1 instead of 4
    bare.load_lora_adapter(load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), prefix="unet")
    assert next(m for m in bare.modules() if hasattr(m, "scaling")).scaling["default_0"] == 1.0
    assert not torch.allclose(run(bare, probe), want, atol=1e-3)


def test_capped_ranks_survive_the_diffusers_format(tmp_path):
    cond = torch.randn(16, generator=torch.Generator().manual_seed(2)).expand(1, 4, 16)
    peft_model = initialize_denoiser(tiny_unet(), latents(2), cond, CNTLoRAConfig(r=4, alpha=8.0, base="residual"),
                                     scheduler=DDPMScheduler())
    save_diffusers_lora(peft_model, tmp_path / "lora")
    loaded = tiny_unet()
    loaded.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", use_safetensors=True)
    layer = dict(loaded.named_modules())[f"{ATTN0}.attn2.to_k"]
    assert layer.r["default_0"] == 2 and layer.scaling["default_0"] == 2.0  # residual: 2·(capped rank 1)
    probe = DenoiserBatches(loaded, latents(2), cond, DDPMScheduler(), seed=9).batch(0)
    assert torch.allclose(run(loaded, probe), run(peft_model, probe), atol=1e-5)
    with pytest.raises(CNTLoRAError, match="not a diffusers LoRA folder"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "keep.txt").write_text("mine")
        save_diffusers_lora(peft_model, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_cntlora_folder_round_trip_of_a_denoiser(tmp_path):
    x, cond = latents(2), prompt_embeddings()
    peft_model = initialize_denoiser(tiny_unet(), x, cond, CNTLoRAConfig(r=4, base="residual"),
                                     scheduler=DDPMScheduler())
    cntlora.save_adapter(peft_model, tmp_path / "adapter")
    loaded = cntlora.load_adapter(tiny_unet(), tmp_path / "adapter")
    probe = DenoiserBatches(tiny_unet(), x, cond, DDPMScheduler(), seed=9).batch(0)
    assert torch.allclose(run(loaded, probe), run(peft_model, probe), atol=1e-6)


# --------------------------------------------------------------------------- folders


def test_pipeline_folder_to_adapter(tmp_path):
    from diffusers import StableDiffusionPipeline

    _, pipeline_dir = tiny_pipeline(tmp_path)
    images = write_images(tmp_path / "images", count=2, size=16)
    classes = write_images(tmp_path / "classes", count=3, size=16, seed=1)
    data = load_denoiser_and_batches(pipeline_dir, images, "a photo of sks dog", classes, "a photo of a dog")
    assert data.latents.shape == (2, 4, 8, 8) and data.conditioning.shape == (1, 16, 16)
    assert data.reference[0].shape == (3, 4, 8, 8) and not torch.equal(data.reference[1], data.conditioning)
    again = load_denoiser_and_batches(pipeline_dir, images, "a photo of sks dog", classes, "a photo of a dog")
    assert torch.equal(again.latents, data.latents) and data.prefix == "unet"
    config = CNTLoRAConfig(r=2, mode="cross", base="keep")
    peft_model = initialize_denoiser(data.denoiser, data.latents, data.conditioning, config, scheduler=data.scheduler,
                                     reference=data.reference, timesteps_per_image=2)
    assert peft_model.cntlora_plan.pretrain_source == "reference"
    # images straight from the folder, encoded by initialize_denoiser with the pipeline's VAE: the same adapter
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    from_images = initialize_denoiser(pipe.unet, read_images(images), data.conditioning, config, vae=pipe.vae,
                                      scheduler=data.scheduler, reference=(read_images(classes), data.reference[1]),
                                      timesteps_per_image=2)
    for name, lp in peft_model.cntlora_plan.layers.items():
        assert torch.allclose(from_images.cntlora_plan.layers[name].B, lp.B, atol=1e-6)
    # the export path: cntlora's folder onto the denoiser alone, then diffusers' format
    cntlora.save_adapter(peft_model, tmp_path / "adapter")
    reloaded = cntlora.load_adapter(load_denoiser(pipeline_dir), tmp_path / "adapter")
    save_diffusers_lora(reloaded, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_bare_denoiser_folder(tmp_path):
    model = tiny_class_unet(classes=None)
    model.save_pretrained(tmp_path / "ddpm" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "ddpm" / "scheduler")
    data = load_denoiser_and_batches(tmp_path / "ddpm" / "unet", write_images(tmp_path / "images", size=8))
    assert data.latents.shape == (2, 3, 8, 8) and data.latents.abs().max() <= 1 and data.conditioning is None
    with pytest.raises(CNTLoRAError, match="has no text encoder"):
        load_denoiser_and_batches(tmp_path / "ddpm" / "unet", tmp_path / "images", prompt="a photo of sks dog")


def test_bad_inputs_give_clear_errors(tmp_path):
    unet, scheduler = tiny_unet(), DDPMScheduler()
    with pytest.raises(CNTLoRAError, match="3 channels but UNet2DConditionModel takes 4; encode images"):
        initialize_denoiser(unet, latents(2, 3), prompt_embeddings(), scheduler=scheduler)
    with pytest.raises(CNTLoRAError, match="timesteps_per_image must be a positive integer"):
        initialize_denoiser(unet, latents(2), prompt_embeddings(), scheduler=scheduler, timesteps_per_image=0)
    with pytest.raises(CNTLoRAError, match="needs conditioning"):
        initialize_denoiser(unet, latents(2), None, scheduler=scheduler)
    with pytest.raises(CNTLoRAError, match="width 8 but the denoiser's cross_attention_dim is 16"):
        initialize_denoiser(unet, latents(2), torch.zeros(1, 3, 8), scheduler=scheduler)
    with pytest.raises(CNTLoRAError, match="mixed sizes"):
        initialize_denoiser(unet, [latents(1)[0], latents(1, size=16)[0]], prompt_embeddings(), scheduler=scheduler)
    with pytest.raises(CNTLoRAError, match="pass scheduler="):
        initialize_denoiser(unet, latents(2), prompt_embeddings(), scheduler=None)
    with pytest.raises(CNTLoRAError, match="unknown weighting 'sigma_sqrt'"):
        initialize_denoiser(unet, latents(2), prompt_embeddings(), scheduler=scheduler, weighting="sigma_sqrt")
    with pytest.raises(CNTLoRAError, match="is unconditional; pass conditioning=None"):
        initialize_denoiser(tiny_class_unet(classes=None), latents(2, 3), torch.tensor([1, 2]), scheduler=scheduler)
    write_images(tmp_path / "mixed", count=2, sizes=[(16, 16), (16, 24)])
    with pytest.raises(CNTLoRAError, match="mixed sizes .* pass resolution="):
        read_images(tmp_path / "mixed")
    assert read_images(tmp_path / "mixed", resolution=8).shape == (2, 3, 8, 8)
    _, pipeline_dir = tiny_pipeline(tmp_path)
    images = write_images(tmp_path / "images", count=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CNTLoRAError, match="empty holds no images"):
        load_denoiser_and_batches(pipeline_dir, images, "a photo of sks dog", tmp_path / "empty", "a photo of a dog")
    with pytest.raises(CNTLoRAError, match="is text-conditioned; pass the instance prompt"):
        load_denoiser_and_batches(pipeline_dir, images)
    with pytest.raises(CNTLoRAError, match="need their prompt"):
        load_denoiser_and_batches(pipeline_dir, images, "a photo of sks dog", images)


def test_cntlora_alone_never_imports_diffusers():
    code = textwrap.dedent("""
        import sys
        import cntlora
        assert "diffusers" not in sys.modules
        sys.modules["diffusers"] = None
        try:
            import cntlora.diffusion
        except cntlora.CNTLoRAError as error:
            assert "pip install 'cntlora[diffusion]'" in str(error), error
        else:
            raise AssertionError("no error without diffusers")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
