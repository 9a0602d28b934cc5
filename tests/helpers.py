"""Tiny models and data for the tests: built from configs, nothing downloaded."""

import torch
from torch import nn


def tiny_bert(num_labels=3, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def token_batches(n_batches=3, batch=4, seq=10, vocab=100, pad_last=0, seed=1):
    """Dict batches; the last `pad_last` positions of every other row are padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_last:
            mask[::2, seq - pad_last:] = 0
            ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class TwoLayerMLP(nn.Module):
    def __init__(self, n=12, h=10, m=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(n, h)
        self.fc2 = nn.Linear(h, m)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyCNN(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.pw = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv(torch.relu(self.pw(x)))
        return self.head(h.mean((2, 3)))


def feature_batches(n_batches=4, batch=16, n=12, seed=2, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, generator=g) * 1.5 + shift for _ in range(n_batches)]


def capture_inputs(model, names, batches, forward=None, mask_of=None):
    """The raw rows entering each named layer, gathered by the test's own hooks."""
    from cntlora.layers import input_rows, layer_spec

    modules = dict(model.named_modules())
    rows = {n: [] for n in names}
    current = {}

    def make(n):
        spec = layer_spec(n, modules[n])

        def hook(mod, args):
            x = args[0].detach().double()
            r = input_rows(x, spec)
            m = current.get("mask")
            if m is not None and spec.kind != "conv2d" and x.shape[:-1] == m.shape:
                r = r[m.reshape(-1)]
            rows[n].append(r)

        return hook

    handles = [modules[n].register_forward_pre_hook(make(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            current["mask"] = mask_of(b) if mask_of else None
            (forward or (lambda m, b: m(**b) if isinstance(b, dict) else m(b)))(model, b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}
