"""save_adapter / load_adapter round trips and the plain-LoRA export, on tiny models built from configs."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import cntlora
from cntlora import CNTLoRAConfig, CNTLoRAError
from cntlora import export as export_module
from cntlora.export import export_plain_lora, load_adapter, save_adapter
from cntlora.layers import find_targets, layer_spec

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    def __init__(self, width: int = 12):
        super().__init__()
        self.conv3 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, width, 1)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = F.relu(self.conv3(x))
        h = F.relu(self.conv1(h))
        return self.head(h.mean(dim=(2, 3)))


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg).eval()


def cnn(width: int = 12):
    torch.manual_seed(0)
    return TinyCNN(width).eval()


def token_batches(n_labels=None, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 64, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, -3:] = 0  # some padding, so masked positions are exercised
        batch = {"input_ids": ids, "attention_mask": mask}
        if n_labels is None:  # causal LM: predict the next token, ignore the padding
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.randint(0, n_labels, (4,), generator=g)
        batches.append(batch)
    return batches


def image_batches(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


# kind -> (make base, target_modules, modules_to_save, data, loss(model, batch), logits(model, batch))
KINDS = {
    "bert": (
        bert, ["query", "value", "intermediate.dense"], ["classifier"], lambda: token_batches(n_labels=3),
        lambda m, b: m(**b).loss, lambda m, b: m(**b).logits,
    ),
    "gpt2": (
        gpt2, ["c_attn", "mlp.c_fc"], None, lambda: token_batches(),
        lambda m, b: m(**b).loss, lambda m, b: m(**b).logits,
    ),
    "cnn": (
        cnn, ["conv3", "conv1"], ["head"], lambda: image_batches(),
        lambda m, b: F.cross_entropy(m(b[0]), b[1]), lambda m, b: m(b[0]),
    ),
}


def outputs(model, kind):
    logits = KINDS[kind][5]
    with torch.no_grad():
        return torch.cat([logits(model, b) for b in KINDS[kind][3]()])


def initialized(kind, base, vas, use_rslora=False, budget_share=0.7):
    """(pristine original base, CNTLoRA PeftModel on a copy of it).

    Random-init models have flat spectra, so VAS at the default budget gives uniform ranks;
    a budget below uniform rank r makes the ranks vary (rank_pattern / alpha_pattern in use).
    """
    make, targets, to_save, data, _, _ = KINDS[kind]
    original = make()
    r = 2
    specs = [layer_spec(n, m) for n, m in find_targets(original, targets).items()]
    budget = int(budget_share * sum(r * (s.out_features + s.in_features) for s in specs)) if vas else None
    cfg = CNTLoRAConfig(mode="cross", r=r, alpha=4.0, base=base, vas=vas, budget=budget, use_rslora=use_rslora, seed=0)
    lora_config = LoraConfig(lora_dropout=0.0, modules_to_save=to_save)
    model = cntlora.initialize(
        copy.deepcopy(original), data(), cfg, target_modules=targets, lora_config=lora_config, progress=False
    )
    return original, model


def train(model, kind, steps=5):
    """Five AdamW steps at lr 1e-2; asserts every trainable tensor really moved."""
    loss_fn, data = KINDS[kind][4], KINDS[kind][3]()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, data[step % len(data)]).backward()
        opt.step()
    model.eval()
    still = [n for n, p in params.items() if (p.detach() - before[n]).abs().max() < 1e-4]
    assert not still, f"parameters did not move: {still}"
    assert any(".lora_B." in n for n in params) and any(".lora_A." in n for n in params)


def lora_modules(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("vas", [False, True], ids=["uniform", "vas"])
@pytest.mark.parametrize("base", ["subspace", "keep", "residual"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "cnn"])
def test_save_reload_train_export(kind, base, vas, tmp_path):
    original, model = initialized(kind, base, vas)
    plan = model.cntlora_plan
    assert bool(plan.rank_pattern) == vas, "VAS should give varied ranks here, uniform ranks otherwise"
    start = outputs(model, kind)
    train(model, kind)
    trained = outputs(model, kind)
    assert (trained - start).abs().max() > 1e-3, "training did not change the outputs; the comparison would be vacuous"

    # save_adapter -> load_adapter on a fresh copy of the ORIGINAL base
    save_adapter(model, tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "cntlora.json", "init_factors.safetensors"} <= files
    assert ("residual_base.safetensors" in files) == (base == "residual")
    reloaded = load_adapter(copy.deepcopy(original), tmp_path / "adapter")
    torch.testing.assert_close(outputs(reloaded, kind), trained, atol=ATOL, rtol=0)
    ranks = {n: m.r["default"] for n, m in lora_modules(reloaded).items()}
    assert ranks == {n: plan.layers[n].rank for n in plan.adapted}
    save_adapter(reloaded, tmp_path / "resaved")  # the reloaded model saves again, residual base included
    resaved = load_adapter(copy.deepcopy(original), tmp_path / "resaved")
    torch.testing.assert_close(outputs(resaved, kind), trained, atol=ATOL, rtol=0)

    # the plain-LoRA export, loaded by plain PEFT on a fresh copy of the ORIGINAL base
    factor = 2 if base == "residual" else 1
    for source, folder in [(model, "export"), (reloaded, "export_after_reload")]:
        export_plain_lora(source, tmp_path / folder)
        plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / folder)
        torch.testing.assert_close(outputs(plain, kind), trained, atol=ATOL, rtol=0)
        layers = lora_modules(plain)
        assert sorted(layers) == sorted(plan.adapted)
        for name, layer in layers.items():
            assert layer.r["default"] == factor * plan.layers[name].rank
            assert layer.scaling["default"] == pytest.approx(plan.scale, rel=1e-12)


def test_residual_base_is_needed(tmp_path):
    """The residual folder really depends on its saved base: plain PEFT on the original base differs."""
    original, model = initialized("bert", "residual", vas=True)
    train(model, "bert")
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "residual_base.safetensors")
    assert sorted(saved) == sorted(model.cntlora_plan.adapted)  # only the changed weights
    wrong = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    assert (outputs(wrong, "bert") - outputs(model, "bert")).abs().max() > 1e-4


def test_residual_rslora_vas_export(tmp_path):
    """rsLoRA: s = alpha/sqrt(r), so doubling r needs alpha·sqrt(2) in every layer's alpha."""
    original, model = initialized("bert", "residual", vas=True, use_rslora=True)
    assert model.cntlora_plan.rank_pattern, "VAS gave uniform ranks; the test would not cover rank_pattern"
    train(model, "bert")
    export_plain_lora(model, tmp_path / "export")
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "export")
    torch.testing.assert_close(outputs(plain, "bert"), outputs(model, "bert"), atol=ATOL, rtol=0)
    for layer in lora_modules(plain).values():
        assert layer.scaling["default"] == pytest.approx(model.cntlora_plan.scale, rel=1e-12)


def test_named_adapter_and_metadata(tmp_path):
    make, targets, to_save, data, _, _ = KINDS["cnn"]
    original = make()
    cfg = CNTLoRAConfig(r=2, alpha=4.0, base="residual", seed=0)
    model = cntlora.initialize(
        copy.deepcopy(original), data(), cfg, target_modules=targets, progress=False, adapter_name="task",
        lora_config=LoraConfig(lora_dropout=0.0, modules_to_save=to_save),
    )
    model.set_adapter("task")
    train(model, "cnn")
    save_adapter(model, tmp_path / "adapter", adapter_name="task")
    assert "task" not in os.listdir(tmp_path / "adapter")  # one adapter, at the top of its folder
    meta = json.loads((tmp_path / "adapter" / "cntlora.json").read_text())
    plan = model.cntlora_plan
    assert meta["config"] == cfg.to_dict() and meta["base"] == "residual"
    assert meta["scale"] == plan.scale and meta["pretrain_source"] == plan.pretrain_source
    assert meta["ranks"] == {n: lp.rank for n, lp in plan.layers.items()}
    reloaded = load_adapter(copy.deepcopy(original), tmp_path / "adapter")
    torch.testing.assert_close(outputs(reloaded, "cnn"), outputs(model, "cnn"), atol=ATOL, rtol=0)
    assert reloaded.cntlora_plan.summary() == plan.summary()
    export_plain_lora(model, tmp_path / "export", adapter_name="task")
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "export")
    torch.testing.assert_close(outputs(plain, "cnn"), outputs(model, "cnn"), atol=ATOL, rtol=0)
    with pytest.raises(CNTLoRAError, match="no adapter 'default'"):
        export_plain_lora(model, tmp_path / "export")


def test_export_with_a_rank_zero_layer(tmp_path):
    original, model = initialized("cnn", "residual", vas=True, budget_share=0.5)
    plan = model.cntlora_plan
    idle = [n for n, lp in plan.layers.items() if lp.rank == 0]
    assert idle and plan.adapted, f"need a rank-0 layer and an adapted one, got ranks {plan.rank_pattern}"
    train(model, "cnn")
    export_plain_lora(model, tmp_path / "export")
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "export")
    assert sorted(lora_modules(plain)) == sorted(plan.adapted)
    torch.testing.assert_close(outputs(plain, "cnn"), outputs(model, "cnn"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "cnn"])
def test_residual_export_matches_peft_conversion(kind, tmp_path):
    """PEFT converts PiSSA-style adapters the same way (save_pretrained with
    path_initial_model_for_weight_conversion); our export must give the same folder."""
    _, model = initialized(kind, "residual", vas=True)
    config = model.peft_config["default"]
    config.init_lora_weights = True  # PEFT's recipe for saving the initial adapter
    model.save_pretrained(tmp_path / "init")
    config.init_lora_weights = False
    train(model, kind)
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    export_plain_lora(model, tmp_path / "ours")

    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    # PEFT's conversion keeps only the LoRA tensors and drops modules_to_save; ours keeps them.
    lora_keys = sorted(k for k in ours if ".lora_A." in k or ".lora_B." in k)
    assert sorted(theirs) == lora_keys
    head = KINDS[kind][2]
    assert bool(set(ours) - set(lora_keys)) == bool(head)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-7, rtol=0)
    theirs_cfg = LoraConfig.from_pretrained(tmp_path / "peft")
    ours_cfg = LoraConfig.from_pretrained(tmp_path / "ours")
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save"):
        assert getattr(ours_cfg, field) == getattr(theirs_cfg, field), field


def folder_bytes(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    original, model = initialized("cnn", "residual", vas=True)
    out, plain = tmp_path / "adapter", tmp_path / "plain"
    save_adapter(model, out)
    export_plain_lora(model, plain)
    good, good_plain, good_outputs = folder_bytes(out), folder_bytes(plain), outputs(model, "cnn")
    train(model, "cnn")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    # PEFT's own files are already written into the staging folder when ours fail
    monkeypatch.setattr(export_module, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, out, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export_plain_lora(model, plain, overwrite=True)
    monkeypatch.undo()
    assert folder_bytes(out) == good and folder_bytes(plain) == good_plain
    assert sorted(os.listdir(tmp_path)) == ["adapter", "plain"], "a staging folder was left behind"
    reloaded = load_adapter(copy.deepcopy(original), out)
    torch.testing.assert_close(outputs(reloaded, "cnn"), good_outputs, atol=ATOL, rtol=0)


def test_failed_swap_restores_previous_adapter(tmp_path, monkeypatch):
    original, model = initialized("cnn", "keep", vas=False)
    out = tmp_path / "export"
    export_plain_lora(model, out)
    good, good_outputs = folder_bytes(out), outputs(model, "cnn")
    train(model, "cnn")
    real_replace = os.replace

    moved = []

    def replace(src, dst):  # the first staged file moves in; the second fails
        if os.path.basename(os.path.dirname(src)).startswith(".export.tmp-"):
            if moved:
                raise OSError("rename failed")
            moved.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        export_plain_lora(model, out, overwrite=True)
    assert moved, "the failure was not part-way through the swap"
    monkeypatch.undo()
    assert folder_bytes(out) == good
    assert os.listdir(tmp_path) == ["export"]
    plain = PeftModel.from_pretrained(copy.deepcopy(original), out)
    torch.testing.assert_close(outputs(plain, "cnn"), good_outputs, atol=ATOL, rtol=0)


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    _, model = initialized("cnn", "keep", vas=False)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(CNTLoRAError, match="not an adapter folder"):
        export_plain_lora(model, tmp_path)
    with pytest.raises(CNTLoRAError, match="not an adapter folder"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_errors_name_the_fix(tmp_path):
    plain = get_peft_model(cnn(), LoraConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(CNTLoRAError, match="cntlora.load_adapter"):
        export_plain_lora(plain, tmp_path / "x")
    with pytest.raises(CNTLoRAError, match="cntlora.load_adapter"):
        save_adapter(plain, tmp_path / "x")

    _, model = initialized("cnn", "residual", vas=False)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(CNTLoRAError, match="shape .* pass the base model the adapter was made from"):
        load_adapter(cnn(width=16), tmp_path / "adapter")
    with pytest.raises(CNTLoRAError, match="fresh copy"):
        load_adapter(model, tmp_path / "adapter")
    with pytest.raises(CNTLoRAError, match="adapter_config.json"):
        load_adapter(cnn(), tmp_path / "missing")

    os.remove(tmp_path / "adapter" / "init_factors.safetensors")
    with pytest.raises(CNTLoRAError, match="init_factors.safetensors is missing"):
        load_adapter(cnn(), tmp_path / "adapter")
