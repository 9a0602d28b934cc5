"""Vision transformers: default targets per family, statistics over every token, images read the way
the model expects, and `cntlora init` on an HF ViT folder. Tiny models built from configs."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cntlora
from cntlora import CNTLoRAError, cli, data, vision

VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64, num_labels=3)
TOKENS = (16 // 4) ** 2 + 1  # patches + [CLS]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of cntlora.cli.main, argparse exits included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def hf_model(kind="vit", channels=3, seed=0, **extra):
    import transformers

    configs = {"vit": ("ViTConfig", "ViTForImageClassification"), "vit-base": ("ViTConfig", "ViTModel"),
               "deit": ("DeiTConfig", "DeiTForImageClassification"),
               "vit_msn": ("ViTMSNConfig", "ViTMSNForImageClassification"),
               "dinov2": ("Dinov2Config", "Dinov2ForImageClassification")}
    config_class, model_class = (getattr(transformers, n) for n in configs[kind])
    torch.manual_seed(seed)
    return model_class(config_class(num_channels=channels, **VIT, **extra)).eval()


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmLikeViT(nn.Module):
    """timm's VisionTransformer layout and layer names, in plain PyTorch."""

    def __init__(self, img=16, patch=4, chans=3, dim=32, depth=2, heads=2, classes=3):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def pixel_batches(n_batches=2, batch=3, channels=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size, size, generator=g) for _ in range(n_batches)]


def gathered_rows(model, layer, batches):
    """Every input row of `layer` over the batches, gathered with a forward hook."""
    rows = []
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()


def check_second_moment(model, layer, targets, batches, tokens_per_image):
    x = gathered_rows(model, layer, batches)
    stats = cntlora.collect_statistics(model, batches, targets, progress=False)
    images = sum(len(b) for b in batches)
    assert x.shape[0] == images * tokens_per_image  # [CLS] and every patch, nothing masked
    moments = stats.moments(layer)
    assert moments.count == images * tokens_per_image
    torch.testing.assert_close(moments.second, x.T @ x / x.shape[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moments.mean, x.mean(0), atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# default targets


@pytest.mark.parametrize("kind, prefix", [("vit", "vit.layers"), ("vit-base", "layers"), ("deit", "deit.layers"),
                                          ("vit_msn", "vit.layers"), ("dinov2", "dinov2.encoder.layer")])
def test_hf_vit_families_target_attention_and_mlp_only(kind, prefix):
    model = hf_model(kind)
    targets = data.default_target_modules(model)
    assert targets == ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                       "mlp.fc1", "mlp.fc2"]
    hit = set(cntlora.layers.find_targets(model, targets))
    assert hit == {f"{prefix}.{i}.{n}" for i in range(2) for n in targets}
    assert not any(n.startswith(("classifier", "pooler")) or "patch_embeddings" in n for n in hit)


def test_dinov2_swiglu_targets_its_gated_mlp():
    targets = data.default_target_modules(hf_model("dinov2", use_swiglu_ffn=True))
    assert targets[-3:] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] and "mlp.fc1" not in targets


def test_timm_layout_gets_timm_targets_never_the_patch_conv():
    model = TimmLikeViT()
    assert vision.is_timm_vit(model) and not vision.is_timm_vit(hf_model("vit"))
    targets = data.default_target_modules(model)
    assert targets == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    hit = set(cntlora.layers.find_targets(model, targets))
    assert len(hit) == 8 and "patch_embed.proj" not in hit and "head" not in hit


def test_a_model_of_no_known_family_names_its_layers_in_the_error():
    with pytest.raises(CNTLoRAError, match="--target-modules .*encoder"):
        data.default_target_modules(nn.ModuleDict({"encoder": nn.Linear(4, 2)}))


# -----------------------------------------------------------------------------
# statistics and initialization


def test_timm_layout_initializes_with_unchanged_output_and_exact_statistics(one_thread):
    torch.manual_seed(0)
    model = TimmLikeViT().eval()
    batches = pixel_batches()
    check_second_moment(model, "blocks.0.attn.qkv", ["attn.qkv"], batches, TOKENS)
    with torch.no_grad():
        before = model(batches[0])
    peft_model = cntlora.initialize(model, batches, cntlora.CNTLoRAConfig(r=4), progress=False,
                                    target_modules=data.default_target_modules(model))
    plan = peft_model.cntlora_plan
    assert len(plan.adapted) == 8 and {lp.rank for lp in plan.layers.values()} == {4}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(batches[0]), before, atol=1e-5, rtol=1e-5)


def test_hf_vit_query_statistics_cover_cls_and_patch_tokens(one_thread):
    model = hf_model("vit")
    batches = pixel_batches()
    check_second_moment(model, "vit.layers.0.attention.q_proj", data.default_target_modules(model), batches, TOKENS)
    # a dict batch reaches pixel_values as well, with the same rows
    stats = cntlora.collect_statistics(model, [{"pixel_values": b} for b in batches], ["attention.q_proj"],
                                       progress=False)
    assert stats.moments("vit.layers.0.attention.q_proj").count == 6 * TOKENS


def test_real_timm_vit(one_thread):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3).eval()
    targets = data.default_target_modules(model)
    assert targets == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    batches = pixel_batches(size=32)
    check_second_moment(model, "blocks.0.attn.qkv", targets, batches, (32 // 8) ** 2 + 1)
    with torch.no_grad():
        before = model(batches[0])
    peft_model = cntlora.initialize(model, batches, cntlora.CNTLoRAConfig(r=4), target_modules=targets,
                                    progress=False)
    assert "patch_embed.proj" not in peft_model.cntlora_plan.layers
    with torch.no_grad():
        torch.testing.assert_close(peft_model(batches[0]), before, atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# images as the model expects them


def write_images(folder, n=4, size=(20, 14), seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def save_vit(folder, channels=3, preprocessor=None):
    hf_model("vit", channels=channels).save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def test_images_are_read_at_the_config_size_with_the_preprocessor_normalization(tmp_path):
    from PIL import Image

    images = write_images(tmp_path / "images")
    model = save_vit(tmp_path / "vit", preprocessor={"image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.6, 0.7]})
    prep = vision.preprocessing_for(data.load_model(str(model))[0], model)
    assert prep == vision.ImagePreprocessing((16, 16), 3, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7))
    drawn = data.load_batches(str(images), None, calibration_size=None, batch_size=3, image=prep)
    assert [tuple(b.shape) for b in drawn.batches] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    with Image.open(images / "0.png") as im:
        x = torch.from_numpy(__import__("numpy").asarray(im.convert("RGB")).copy()).float().div(255)
    x = F.interpolate(x.permute(2, 0, 1)[None], size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    want = (x - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(drawn.batches[0][:1], want)
    # without a preprocessor file: transformers' ViT default; a 1-channel model reads grayscale
    gray = vision.preprocessing_for(hf_model("vit", channels=1), tmp_path / "nowhere")
    assert gray == vision.ImagePreprocessing((16, 16), 1, (0.5,), (0.5,))
    assert gray.read([images / "0.png"]).shape == (1, 1, 16, 16)
    assert vision.preprocessing_for(TimmLikeViT()) is None  # CNNs and non-HF models keep 3×64×64


@pytest.mark.parametrize("pre, message", [({"image_mean": [0.1, 0.2]}, "takes 3 channel"),
                                          ({"image_std": [0.5, 0.0, 0.5]}, "image_std"), ("{oops", "is not JSON")])
def test_a_bad_preprocessor_file_names_the_fix(tmp_path, pre, message):
    (tmp_path / "preprocessor_config.json").write_text(pre if isinstance(pre, str) else json.dumps(pre))
    with pytest.raises(CNTLoRAError, match=message):
        vision.preprocessing_for(hf_model("vit"), tmp_path)


def test_an_unreadable_image_names_the_file(tmp_path):
    write_images(tmp_path / "images", n=2)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CNTLoRAError, match="broken.png cannot be read as an image.*re-save it"):
        data.load_batches(str(tmp_path / "images"), None, calibration_size=None)


# -----------------------------------------------------------------------------
# the command line


def base_output(folder, x):
    with torch.no_grad():
        return data.load_model(str(folder))[0](pixel_values=x).logits


@pytest.mark.parametrize("channels", [3, 1])
def test_cli_init_on_an_hf_vit_folder_keeps_the_output_at_step_zero(tmp_path, capsys, channels, one_thread):
    from transformers import ViTImageProcessor

    images = write_images(tmp_path / "images", n=5)
    model = save_vit(tmp_path / "vit", channels=channels)
    mean = [0.45, 0.4, 0.35][:channels]
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=mean, image_std=[0.25] * channels).save_pretrained(model)
    code, stdout, err = run_cli(capsys, "init", model, images, "--out", tmp_path / "adapter", "--r", 4, "--quiet")
    assert code == 0, err
    assert "calibration: 5 of 5 images, 1,280 pixels (16×16 each)" in stdout
    ranks = json.loads((tmp_path / "adapter" / "cntlora.json").read_text())["ranks"]
    assert set(ranks) == {f"vit.layers.{i}.{n}" for i in range(2) for n in vision.HF_VIT_SUFFIXES[:6]}
    x = vision.preprocessing_for(data.load_model(str(model))[0], model).read(sorted(images.iterdir()))
    assert x.shape == (5, channels, 16, 16)
    want = base_output(model, x)
    loaded = cntlora.load_adapter(data.load_model(str(model))[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, want, atol=1e-5, rtol=1e-5)


def test_cli_vit_with_a_reference_folder(tmp_path, capsys, one_thread):
    images, reference = write_images(tmp_path / "images", n=3), write_images(tmp_path / "ref", n=4, seed=1)
    model = save_vit(tmp_path / "vit")
    code, stdout, err = run_cli(capsys, "init", model, images, "--out", tmp_path / "adapter", "--r", 2, "--mode",
                                "cross", "--reference", reference, "--pretrain-source", "reference", "--quiet")
    assert code == 0, err
    assert "reference: 4 of 4 images, 1,024 pixels (16×16 each)" in stdout


def test_cli_bad_vision_inputs_are_one_line(tmp_path, capsys):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    images = write_images(tmp_path / "images", n=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-config").mkdir()
    save_vit(tmp_path / "vit")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"not a jpeg")
    ConvNextForImageClassification(ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                  num_labels=2)).save_pretrained(tmp_path / "convnext")
    cases = [("vit", "empty", "holds no images"), ("no-config", "images", "has no config.json"),
             ("no-weights", "images", "no weights"), ("vit", "broken", "cannot be read as an image"),
             ("convnext", "images", "no default target modules for model type 'convnext'")]
    for model, folder, message in cases:
        code, _, err = run_cli(capsys, "init", tmp_path / model, tmp_path / folder, "--out", tmp_path / "out", "--quiet")
        assert code == 2 and err.startswith("cntlora: error: ") and err.count("\n") == 1, err
        assert message in err and "Traceback" not in err
