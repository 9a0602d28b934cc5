"""Statistics collection: sharing, masking, conv/Conv1D equivalence, memory passes, files."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cntlora
from cntlora import CNTLoRAConfig, CNTLoRAError

from helpers import TinyCNN, TwoLayerMLP, capture_inputs, feature_batches, tiny_bert, tiny_gpt2, tiny_llama, token_batches


def close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-12)


def test_shared_inputs_share_one_statistic():
    model = tiny_bert()
    stats = cntlora.collect_statistics(model, token_batches(), ["query", "key", "value", "dense"], progress=False)
    for layer in range(2):
        prefix = f"bert.encoder.layer.{layer}.attention.self."
        assert stats.groups[prefix + "key"] == prefix + "query"
        assert stats.groups[prefix + "value"] == prefix + "query"
        assert prefix + "key" not in stats.fine and prefix + "value" not in stats.fine
    # per layer: q/k/v, attention.output.dense, intermediate.dense, output.dense; plus the pooler
    assert len(stats.fine) == 2 * 4 + 1
    alone = cntlora.collect_statistics(model, token_batches(), ["key"], progress=False)
    name = "bert.encoder.layer.1.attention.self.key"
    shared = stats.fine[stats.groups[name]]
    assert torch.equal(alone.fine[name].outer, shared.outer)


def test_padding_is_excluded():
    model = tiny_bert()
    padded = token_batches(n_batches=2, pad_last=4)
    trimmed = []
    for b in padded:  # the same sequences, one at a time and without their padding
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            keep = mask.bool()
            trimmed.append({"input_ids": ids[keep][None], "attention_mask": mask[keep][None]})
    targets = ["query", "intermediate.dense", "output.dense"]
    a = cntlora.collect_statistics(model, padded, targets, progress=False)
    b = cntlora.collect_statistics(model, trimmed, targets, progress=False)
    total = sum(int(x["attention_mask"].sum()) for x in padded)
    for g in a.fine:
        assert float(a.fine[g].count) == total == float(b.fine[g].count)
        assert close(a.fine[g].outer, b.fine[g].outer, 1e-4)
        assert close(a.fine[g].total, b.fine[g].total, 1e-4)


def test_labels_minus_100_are_excluded():
    model = tiny_llama()
    batches = token_batches(n_batches=2)
    for b in batches:
        b["labels"] = b["input_ids"].clone()
        b["labels"][:, :3] = -100
    stats = cntlora.collect_statistics(model, batches, ["q_proj"], progress=False)
    kept = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert all(float(s.count) == kept for s in stats.fine.values())
    raw = capture_inputs(model, ["model.layers.0.self_attn.q_proj"], batches,
                         mask_of=lambda b: b["labels"] != -100)["model.layers.0.self_attn.q_proj"]
    assert close(stats.fine["model.layers.0.self_attn.q_proj"].outer, raw.T @ raw, 1e-5)


class PatchLinear(nn.Module):
    """A Linear applied to unfolded conv patches: the reference for the conv path."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.lin = nn.Linear(conv.weight[0].numel(), conv.out_channels)
        with torch.no_grad():
            self.lin.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            self.lin.bias.copy_(conv.bias)

    def forward(self, x):
        return self.lin(F.unfold(x, self.conv.kernel_size, padding=self.conv.padding, stride=self.conv.stride).transpose(1, 2))


@pytest.mark.parametrize("base", ["keep", "residual"])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 2, 1), (3, 1, 0)])
def test_conv2d_equals_equivalent_linear(kernel, stride, padding, base):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 5, kernel, stride=stride, padding=padding))
    lin = PatchLinear(conv[0])
    images = [torch.randn(3, 4, 7, 7) for _ in range(3)]
    cfg = CNTLoRAConfig(mode="cross", r=3, base=base)
    s_conv = cntlora.collect_statistics(conv, images, ["0"], progress=False)
    s_lin = cntlora.collect_statistics(lin, images, ["lin"], progress=False)
    assert close(s_conv.fine["0"].outer, s_lin.fine["lin"].outer)
    p_conv, p_lin = cntlora.solve(conv, s_conv, cfg), cntlora.solve(lin, s_lin, cfg)
    d_conv = p_conv.layers["0"].B.double() @ p_conv.layers["0"].A.double()
    d_lin = p_lin.layers["lin"].B.double() @ p_lin.layers["lin"].A.double()
    assert close(d_conv, d_lin) and float(d_lin.abs().max()) > 0
    ref = conv(images[0])
    peft_conv = cntlora.apply(conv, p_conv)
    out = peft_conv(images[0])
    if base == "residual":
        assert close(out, ref)
    else:  # keep: the output moves by s·B·A applied to the patches
        patches = F.unfold(images[0], kernel, padding=padding, stride=stride).transpose(1, 2).double()
        moved = p_conv.scale * patches @ d_conv.T
        assert close((out - ref).flatten(2).transpose(1, 2).double(), moved, 1e-4)


def test_conv1d_equals_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    c1d = nn.Sequential(Conv1D(6, 9))  # nf=6 outputs, nx=9 inputs; weight stored 9×6
    lin = nn.Sequential(nn.Linear(9, 6))
    with torch.no_grad():
        lin[0].weight.copy_(c1d[0].weight.T)
        lin[0].bias.copy_(c1d[0].bias)
    data = feature_batches(n=9)
    cfg = CNTLoRAConfig(mode="shift", r=3, base="keep")
    plans = []
    for model in (c1d, lin):
        stats = cntlora.collect_statistics(model, data, ["0"], progress=False)
        plans.append(cntlora.solve(model, stats, cfg).layers["0"])
    assert close(plans[0].B @ plans[0].A, plans[1].B @ plans[1].A)


def test_gpt2_conv1d_residual_is_identity_at_step_zero():
    model = tiny_gpt2()
    batches = token_batches()
    ref = model(**batches[0]).logits
    peft_model = cntlora.initialize(copy.deepcopy(model), batches, CNTLoRAConfig(r=4, base="residual"),
                                    target_modules=["c_attn", "c_fc"], progress=False)
    assert close(peft_model(**batches[0]).logits, ref)


def test_memory_cap_splits_into_passes_with_same_result():
    model = tiny_llama()
    batches = token_batches()
    targets = ["q_proj", "o_proj", "down_proj"]
    one = cntlora.collect_statistics(model, batches, targets, progress=False)
    cap = 8 * (48 * 48 + 49)  # room for one 48-dim input at a time
    split = cntlora.collect_statistics(model, batches, targets, max_stats_memory=cap, progress=False)
    assert split.info["fine"]["passes"] > 1
    assert split.groups == one.groups
    for g in one.fine:
        assert torch.equal(one.fine[g].outer, split.fine[g].outer)


def _capped_llama():
    """tiny_llama, its batches, three targets and a cap that fits one 48-wide input at a time."""
    return tiny_llama(), token_batches(), ["q_proj", "o_proj", "down_proj"], 8 * (48 * 48 + 49)


@pytest.mark.parametrize("cfg", [CNTLoRAConfig(r=4), CNTLoRAConfig(mode="cross", r=4, vas=True)])
def test_streamed_solve_of_capped_passes_gives_the_one_pass_adapter(cfg):
    model, batches, targets, cap = _capped_llama()
    one = cntlora.solve(model, cntlora.collect_statistics(model, batches, targets, progress=False), cfg)
    parts = list(cntlora.iter_statistics(model, batches, targets, max_stats_memory=cap, progress=False))
    assert len(parts) > 1 and sorted(n for p in parts for n in p.layers) == sorted(one.layers)
    streamed = cntlora.solve_parts(model, iter(parts), cfg)
    assert list(streamed.layers) == list(one.layers) and streamed.rank_pattern == one.rank_pattern
    for name, lp in one.layers.items():
        assert torch.equal(lp.B, streamed.layers[name].B) and torch.equal(lp.A, streamed.layers[name].A)
    assert streamed.stats_info["bytes"] == sum(p.nbytes() for p in parts)
    # initialize streams the same way and ends with the same weights
    peft_model = cntlora.initialize(copy.deepcopy(model), batches, cfg, target_modules=targets,
                                    max_stats_memory=cap, progress=False)
    state = peft_model.state_dict()
    for name, lp in one.layers.items():
        key = next(k for k in state if k.endswith(f"{name}.lora_A.default.weight"))
        assert torch.equal(state[key], lp.A)


def test_streamed_passes_with_a_reference_set_give_the_one_pass_adapter():
    model, batches, targets, cap = _capped_llama()
    reference = token_batches(seed=7)
    cfg = CNTLoRAConfig(mode="cross", r=4, pretrain_source="reference")
    one = cntlora.solve(model, cntlora.collect_statistics(model, batches, targets, reference_dataloader=reference,
                                                          progress=False), cfg)
    parts = cntlora.iter_statistics(model, batches, targets, reference_dataloader=reference, max_stats_memory=cap,
                                    progress=False)
    streamed = cntlora.solve_parts(model, parts, cfg, release=True)
    assert streamed.pretrain_source == "reference" and streamed.stats_info["reference"]["passes"] > 1
    for name, lp in one.layers.items():
        assert torch.equal(lp.B, streamed.layers[name].B) and torch.equal(lp.A, streamed.layers[name].A)


def test_streamed_solve_holds_one_pass_of_statistics_at_a_time():
    """With release=True each part's sums die before the next pass starts collecting."""
    import weakref

    model, batches, targets, cap = _capped_llama()
    alive = []  # weak references to the sums of the parts handed out so far

    def watched(parts):
        for part in parts:
            assert all(ref() is None for ref in alive), "an earlier pass's sums are still alive"
            alive.extend(weakref.ref(t) for s in part.fine.values() for t in s.tensors())
            yield part
            del part

    parts = watched(cntlora.iter_statistics(model, batches, targets, max_stats_memory=cap, progress=False))
    plan = cntlora.solve_parts(model, parts, CNTLoRAConfig(r=4), release=True)
    assert len(alive) > 3 * 3 and all(ref() is None for ref in alive) and len(plan.layers) == 3 * 2


def test_collected_parts_merge_offloaded_and_in_the_model_order():
    model, batches, targets, cap = _capped_llama()
    one = cntlora.collect_statistics(model, batches, targets, progress=False)
    split = cntlora.collect_statistics(model, batches, targets, max_stats_memory=cap, offload=True, progress=False)
    assert list(split.layers) == list(one.layers) and split.weight_digest == one.weight_digest
    assert split.fingerprint == one.fingerprint and all(t.device.type == "cpu" for s in split.fine.values() for t in s.tensors())
    parts = list(cntlora.iter_statistics(model, batches, targets, max_stats_memory=cap, progress=False))
    with pytest.raises(CNTLoRAError, match="already hold"):
        parts[0].merge(parts[0])
    with pytest.raises(CNTLoRAError, match="no statistics were given"):
        cntlora.solve_parts(model, [], CNTLoRAConfig(r=4))


def test_token_and_batch_caps():
    model = tiny_bert()
    batches = token_batches(n_batches=5, batch=2, seq=10)
    s = cntlora.collect_statistics(model, batches, ["query"], max_batches=2, progress=False)
    assert float(next(iter(s.fine.values())).count) == 40
    s = cntlora.collect_statistics(model, batches, ["query"], max_tokens=50, progress=False)
    assert float(next(iter(s.fine.values())).count) == 60  # stops after the batch that crosses the cap


def test_training_mode_restored():
    model = tiny_bert().train()
    model.classifier.eval()
    cntlora.collect_statistics(model, token_batches(), ["query"], progress=False)
    assert model.training and model.bert.encoder.training and not model.classifier.training


def test_save_load_roundtrip_and_no_overwrite(tmp_path):
    model = tiny_bert()
    stats = cntlora.collect_statistics(model, token_batches(), ["query", "value"],
                                       reference_dataloader=token_batches(seed=5), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = cntlora.Statistics.load(path)
    assert loaded.groups == stats.groups and loaded.fingerprint == stats.fingerprint
    for g in stats.fine:
        assert torch.equal(loaded.fine[g].outer, stats.fine[g].outer)
        assert torch.equal(loaded.reference[g].total, stats.reference[g].total)
    cfg = CNTLoRAConfig(mode="cross", r=4)
    a, b = cntlora.solve(model, stats, cfg), cntlora.solve(model, loaded, cfg)
    assert all(torch.equal(a.layers[n].A, b.layers[n].A) for n in a.layers)
    before = path.read_bytes()
    with pytest.raises(CNTLoRAError, match="overwrite"):
        stats.save(path)
    assert path.read_bytes() == before


def test_same_inputs_same_adapter():
    batches = token_batches()
    cfg = CNTLoRAConfig(mode="shift", r=4, base="residual", vas=True)
    outs = []
    for _ in range(2):
        pm = cntlora.initialize(tiny_bert(), batches, cfg, target_modules=["query", "value"], progress=False)
        outs.append({k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k})
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


# ---- bad input: one clear error that names the fix ----

def test_error_empty_dataloader():
    with pytest.raises(CNTLoRAError, match="no batches"):
        cntlora.collect_statistics(TwoLayerMLP(), [], ["fc1"], progress=False)


def test_error_target_matches_nothing():
    with pytest.raises(CNTLoRAError, match="matched no layer.*fc1"):
        cntlora.collect_statistics(TwoLayerMLP(), feature_batches(), ["nope"], progress=False)


def test_error_rank_too_large():
    model = TwoLayerMLP(n=12, h=10, m=6)
    stats = cntlora.collect_statistics(model, feature_batches(), ["fc1", "fc2"], progress=False)
    with pytest.raises(CNTLoRAError, match=r"r=8 is larger than min\(m, n\)=6.*lower r"):
        cntlora.solve(model, stats, CNTLoRAConfig(r=8))


def test_error_nan_activations():
    data = feature_batches()
    data[1][0, 3] = float("nan")
    with pytest.raises(CNTLoRAError, match="NaN or Inf.*fc1"):
        cntlora.collect_statistics(TwoLayerMLP(), data, ["fc1"], progress=False)


def test_error_statistics_from_another_model(tmp_path):
    stats = cntlora.collect_statistics(TwoLayerMLP(seed=0), feature_batches(), ["fc1"], progress=False)
    stats.save(tmp_path / "s.safetensors")
    loaded = cntlora.Statistics.load(tmp_path / "s.safetensors")
    with pytest.raises(CNTLoRAError, match="weights of .*differ.*collect statistics on this model"):
        cntlora.solve(TwoLayerMLP(seed=1), loaded, CNTLoRAConfig(r=2))
    with pytest.raises(CNTLoRAError, match="other layer shapes"):
        cntlora.solve(TwoLayerMLP(n=12, h=11), loaded, CNTLoRAConfig(r=2))
    with pytest.raises(CNTLoRAError, match="lacks"):
        cntlora.solve(tiny_bert(), loaded, CNTLoRAConfig(r=2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="diagonal"), "unknown mode 'diagonal'; use one of 'self', 'cross', 'shift'"),
    (dict(pretrain_source="imagenet"), "unknown pretrain_source 'imagenet'"),
    (dict(base="merge"), "unknown base 'merge'"),
    (dict(r=0), "r must be a positive integer"),
])
def test_error_bad_config(kwargs, match):
    with pytest.raises(CNTLoRAError, match=match):
        CNTLoRAConfig(**kwargs)


def test_error_reference_source_without_reference():
    model = TwoLayerMLP()
    stats = cntlora.collect_statistics(model, feature_batches(), ["fc1"], progress=False)
    with pytest.raises(CNTLoRAError, match="reference_dataloader"):
        cntlora.solve(model, stats, CNTLoRAConfig(mode="cross", r=2, pretrain_source="reference"))


def test_error_unsupported_layer_type():
    model = tiny_bert()
    with pytest.raises(CNTLoRAError, match="Embedding.*supports nn.Linear"):
        cntlora.collect_statistics(model, token_batches(), ["word_embeddings"], progress=False)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(CNTLoRAError, match="groups=4"):
        cntlora.collect_statistics(depthwise, [torch.randn(1, 4, 5, 5)], ["0"], progress=False)


def test_error_fully_masked():
    batches = token_batches(n_batches=1)
    batches[0]["attention_mask"][:] = 0
    with pytest.raises(CNTLoRAError, match="masked out"):
        cntlora.collect_statistics(tiny_bert(), batches, ["query"], progress=False)


def test_saved_statistics_have_ordinary_permissions(tmp_path):
    import os

    stats = cntlora.collect_statistics(TwoLayerMLP(), feature_batches(), ["fc1"], progress=False)
    stats.save(tmp_path / "s.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
