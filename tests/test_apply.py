"""apply/initialize: PEFT models whose step-0 behaviour is exactly what each base mode promises."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from torch import nn

import cntlora
from cntlora import AdvancedConfig, CNTLoRAConfig, CNTLoRAError

from helpers import TinyCNN, TwoLayerMLP, feature_batches, tiny_bert, tiny_llama, token_batches


def close(a, b, tol=1e-5):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("mode", ["self", "cross", "shift"])
@pytest.mark.parametrize("base", ["residual", "subspace"])
def test_output_unchanged_at_step_zero(mode, base):
    model = tiny_llama()
    batches = token_batches()
    ref = model(**batches[0]).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = cntlora.initialize(copy.deepcopy(model), batches, CNTLoRAConfig(mode=mode, r=4, base=base),
                            target_modules=targets, progress=False)
    assert isinstance(pm, PeftModel)
    assert close(pm(**batches[0]).logits, ref)
    lora_b = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * len(targets)
    if base == "subspace":
        assert all(torch.count_nonzero(p) == 0 for p in lora_b)
    else:  # the adapter really carries the update, and W0 was reduced by it
        assert all(torch.count_nonzero(p) > 0 for p in lora_b)
        assert not torch.equal(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
                               model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_objective_truncation_residual_start_keeps_the_output(mode):
    model = tiny_llama()
    batches = token_batches()
    ref = model(**batches[0]).logits
    cfg = CNTLoRAConfig(mode=mode, r=4, base="residual", strength=None, advanced=AdvancedConfig(truncation="objective"))
    pm = cntlora.initialize(copy.deepcopy(model), batches, cfg, target_modules=["q_proj", "down_proj"], progress=False)
    assert close(pm(**batches[0]).logits, ref)
    assert all(torch.count_nonzero(p) > 0 for n, p in pm.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("mode", ["self", "cross", "shift"])
def test_keep_moves_output_by_exactly_sBA(mode):
    model = nn.Sequential(nn.Linear(12, 7))
    data = feature_batches()
    x = data[0]
    ref = model(x)
    cfg = CNTLoRAConfig(mode=mode, r=3, alpha=6.0, base="keep")
    pm = cntlora.initialize(copy.deepcopy(model), data, cfg, target_modules=["0"], progress=False)
    lp = pm.cntlora_plan.layers["0"]
    expected = ref.double() + cfg.scale * x.double() @ (lp.B.double() @ lp.A.double()).T
    assert close(pm(x), expected)
    assert float((pm(x) - ref).abs().max()) > 1e-4  # it does move


def test_conv_model_identity_and_keep():
    model = TinyCNN()
    images = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    ref = model(images[0])
    pm = cntlora.initialize(copy.deepcopy(model), images, CNTLoRAConfig(r=2, base="residual"),
                            target_modules=["pw", "conv"], progress=False)
    assert close(pm(images[0]), ref)


def test_lora_config_is_honoured():
    model = tiny_bert(num_labels=3)
    user = LoraConfig(task_type="SEQ_CLS", modules_to_save=["classifier"], lora_dropout=0.1, bias="lora_only",
                      r=99, target_modules=["ignored"])
    pm = cntlora.initialize(model, token_batches(), CNTLoRAConfig(r=4, alpha=8, use_rslora=True),
                            target_modules=["query", "value"], lora_config=user, progress=False)
    cfg = pm.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.use_rslora
    assert cfg.lora_dropout == 0.1 and cfg.bias == "lora_only" and cfg.task_type == "SEQ_CLS"
    assert "classifier" in cfg.modules_to_save
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    q = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    assert abs(q.scaling["default"] - 8 / 4**0.5) < 1e-12  # rsLoRA scale
    assert user.r == 99  # the user's object is not mutated


def test_trains_only_adapters():
    model = tiny_bert(num_labels=3)
    batches = token_batches()
    pm = cntlora.initialize(model, batches, CNTLoRAConfig(r=4, base="residual"), target_modules=["query", "value"],
                            progress=False)
    pm.train()
    out = pm(**batches[0], labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_error_rejects_non_lora_config():
    model = TwoLayerMLP()
    stats = cntlora.collect_statistics(model, feature_batches(), ["fc1"], progress=False)
    plan = cntlora.solve(model, stats, CNTLoRAConfig(r=2))
    with pytest.raises(CNTLoRAError, match="peft.LoraConfig"):
        cntlora.apply(model, plan, lora_config={"r": 2})
    with pytest.raises(CNTLoRAError, match="use_dora"):
        cntlora.apply(model, plan, lora_config=LoraConfig(use_dora=True))
