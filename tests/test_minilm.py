"""The real packaged all-MiniLM-L6-v2 on 64 real BBC News articles, every mode."""

import copy

import pytest
import torch
from peft import LoraConfig

import cntlora
from cntlora import CNTLoRAConfig, zoo


@pytest.fixture(scope="module")
def minilm_and_batches():
    model, tok = zoo.load_minilm(num_labels=5)
    texts, labels, _ = zoo.bbc_news()
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(texts), generator=g)[:64].tolist()
    batches = zoo.text_classification_batches(tok, [texts[i] for i in pick], [labels[i] for i in pick],
                                              batch_size=16, max_length=128)
    return model.eval(), batches


@pytest.mark.parametrize("mode", ["self", "cross", "shift"])
def test_minilm_bbc_each_mode(minilm_and_batches, mode):
    model, batches = minilm_and_batches
    ref = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    lora = LoraConfig(task_type="SEQ_CLS", modules_to_save=["classifier"])
    pm = cntlora.initialize(copy.deepcopy(model), batches, CNTLoRAConfig(mode=mode, r=8, base="residual"),
                            target_modules=["query", "key", "value", "dense"], lora_config=lora, progress=False)
    assert len(pm.cntlora_plan.layers) == 6 * 6 + 1  # q, k, v, 3 dense per layer, and the pooler
    out = pm(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), float((out - ref).abs().max())

    # a training loss is computed and reaches lora_A and lora_B (and the new head), nothing else
    pm.train()
    loss = pm(**batches[1]).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in grads)
    frozen = {n for n, p in pm.named_parameters() if not p.requires_grad}
    assert all(pm.get_parameter(n).grad is None for n in frozen)
