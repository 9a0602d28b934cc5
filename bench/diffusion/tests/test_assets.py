"""CPU checks of the Fashion-MNIST DreamBooth assets: vocabulary, views, loaders, sampling."""

import pytest
import torch

from bench.diffusion import assets, data, tokens

ART = assets.ARTIFACTS
needs_base = pytest.mark.skipif(not (ART / "denoiser.safetensors").exists(), reason="denoiser not built")
needs_encoder = pytest.mark.skipif(not (ART / "encoder.safetensors").exists(), reason="encoder not built")
needs_subjects = pytest.mark.skipif(not (ART / "subjects.safetensors").exists(), reason="subjects not built")


def test_prompt_ids_pad_with_null_and_reject_unknown_or_long():
    assert tokens.prompt_ids(["sks", "dress"]) == [tokens.token_id("sks"), tokens.token_id("dress")] + [0, 0]
    assert tokens.prompt_ids([]) == [tokens.NULL_ID] * tokens.CONTEXT_LENGTH
    with pytest.raises(KeyError):
        tokens.prompt_ids(["dog"])
    with pytest.raises(ValueError):
        tokens.prompt_ids(["sks"] * (tokens.CONTEXT_LENGTH + 1))
    ids = tokens.class_ids(torch.tensor([0, 9]), drop=torch.tensor([False, True]))
    assert ids.tolist() == [[tokens.token_id("t-shirt"), 0, 0, 0], [0, 0, 0, 0]]


def test_augment_identity_and_integer_shift_are_exact():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(data.augment(x, data.identity_params(2)), x)
    shifted = data.augment(x, torch.tensor([[2.0, 0, 0, 1, 1], [0, -1.0, 0, 1, 1]]))
    assert torch.allclose(shifted[0, ..., 2:], x[0, ..., :-2], atol=1e-6)
    assert torch.allclose(shifted[1, :, :-1], x[1, :, 1:], atol=1e-6)


@needs_base
def test_base_loads_encodes_and_samples_deterministically():
    unet, table, scheduler = assets.load_base("cpu")
    n_params = sum(p.numel() for p in unet.parameters())
    assert 9e6 < n_params < 26e6
    assert table.weight.shape == (len(tokens.VOCAB), unet.config.cross_attention_dim)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    assert assets.encode_prompt(table, ["sks", "dress"]).shape == (1, tokens.CONTEXT_LENGTH, table.weight.shape[1])
    assert assets.encode_prompt(table, [["dress"], []]).shape[0] == 2
    a = assets.sample_images(unet, table, scheduler, ["dress"], 1, seed=3, steps=2)
    b = assets.sample_images(unet, table, scheduler, ["dress"], 1, seed=3, steps=2)
    c = assets.sample_images(unet, table, scheduler, ["dress"], 1, seed=4, steps=2)
    assert a.shape == (1, 1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0


def test_fashion_sample_is_seeded_and_in_range():
    x, y = assets.fashion_sample(16, seed=5)
    x2, y2 = assets.fashion_sample(16, seed=5)
    assert x.shape == (16, 1, 32, 32) and torch.equal(x, x2) and torch.equal(y, y2)
    assert x.min() >= -1 and x.max() <= 1 and (x[..., :2, :] == -1).all()


@needs_encoder
def test_encoder_prefers_views_of_the_same_item():
    enc = assets.load_encoder("cpu")
    x, _ = assets.fashion_sample(8, seed=1, split="test")
    g = torch.Generator().manual_seed(0)
    v1 = data.augment(x, data.random_aug_params(8, g))
    v2 = data.augment(x, data.random_aug_params(8, g))
    sim = enc(v1) @ enc(v2).T
    assert torch.allclose(enc(v1).norm(dim=1), torch.ones(8), atol=1e-4)
    assert (sim.argmax(1) == torch.arange(8)).float().mean() >= 0.75


@needs_subjects
def test_subjects_are_distinct_test_items_with_reproducible_views():
    subjects = assets.load_subjects()
    assert len(subjects) >= 5
    assert len({s.token for s in subjects}) == len(subjects) == len({s.label for s in subjects})
    test_images, _ = data.load_fashion_mnist("test")
    for s in subjects:
        assert s.token in tokens.RARE_TOKENS and s.prompt == [s.token, s.class_name]
        assert s.train_views.shape[0] >= 4 and s.heldout_views.shape[0] >= 8
        assert torch.equal(s.image, data.to_model_space(test_images[s.test_index:s.test_index + 1])[0])
        k = s.train_views.shape[0]
        assert torch.allclose(data.augment(s.image.expand(k, -1, -1, -1), s.train_params), s.train_views)
