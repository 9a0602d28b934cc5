"""The DreamBooth benchmark end to end on a tiny random denoiser (CPU, two steps), and the
stacked runs against PEFT's own LoRA training."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("diffusers")

from bench.diffusion import assets, dreambooth_report, dreambooth_run, methods  # noqa: E402
from bench.diffusion.dreambooth_stack import StackedAdamW, install, remove  # noqa: E402
from bench.diffusion.dreambooth_tiny import make_tiny_artifacts  # noqa: E402

TINY = ["--tiny", "--steps", "2", "--sample-steps", "1", "--prior-steps", "1", "--prior-count", "4",
        "--fashion-count", "4", "--eval-draws", "2", "--samples", "2", "--class-samples", "2", "--other-samples", "1",
        "--other-classes", "1", "--loss-every", "1", "--threads", "1"]


def test_pipeline_end_to_end(tmp_path):
    out = tmp_path / "db"
    dev = ["--phase", "dev", "--out", str(out), "--lrs", "1e-3", "3e-3", "--target-sets", "attention", "attention+conv",
           "--only", "default", "olora", "cntlora-cross@prior", "cntlora-cross-vas@prior"]
    assert dreambooth_run.main(TINY + dev) == 0
    records = dreambooth_report.load([out / "runs.jsonl"])
    # target sets × subjects × (methods searching the lr × lrs + settings at their mode's lr)
    assert len(records) == 2 * 2 * (3 * 2 + 1)
    not_run = dreambooth_report.errors(records)
    assert "Unknown initialization" in not_run["attention+conv"]["olora"]  # PEFT's OLoRA rejects Conv2d
    lrs = dreambooth_report.choose_lrs(records)
    assert set(lrs["attention"]) == {"default", "olora", "cntlora-cross@prior", "cntlora-cross-vas@prior"}
    assert "olora" not in lrs["attention+conv"]
    assert lrs["attention"]["cntlora-cross-vas@prior"] == lrs["attention"]["cntlora-cross@prior"]
    choices = tmp_path / "lrs.json"
    choices.write_text(json.dumps(lrs))
    confirm = ["--phase", "confirm", "--out", str(out), "--choices", str(choices), "--seeds", "1", "2",
               "--subject-range", "0", "2",
               "--fidelity-at", "1", "2"]
    assert dreambooth_run.main(TINY + confirm) == 0
    report = tmp_path / "report"
    assert dreambooth_report.main([str(out / "runs.jsonl"), "--out", str(report), "--samples", str(out / "samples.pt"),
                                   "--primary", "attention|cntlora-cross@prior"]) == 0
    result = json.loads((report / "dreambooth.json").read_text())
    m = result["summary"]["attention"]["methods"]["cntlora-cross@prior"]
    assert m["pairs"] == 4 and set(m["fidelity_curve"]) == {"1", "2"} and len(m["train_loss_curve"]) == 2
    assert set(m["vs_default"]["fidelity"]) >= {"mean", "ci95", "p", "verdict"}
    vs = result["against_peft"]["fidelity"]
    assert set(vs) == {"attention|default", "attention|olora", "attention+conv|default"}
    assert result["dev_pick"].split("|")[1].startswith("cntlora-") and all("p_holm" in d for d in vs.values())
    assert result["tasks"]["dreambooth-attention"]["methods"]["default"]["steps_to_target"] in (1, 2)
    for name in ("dreambooth-curves.png", "dreambooth-samples-attention.png", "dreambooth-tables.md"):
        assert (report / name).stat().st_size > 0


def test_stacked_runs_match_separate_peft_training(tmp_path):
    """K runs in one stack (conv and linear layers, a W0 offset, uneven VAS ranks) train exactly as K PEFT models."""
    from peft import LoraConfig, get_peft_model

    root = make_tiny_artifacts(tmp_path / "art", subjects=1)
    unet, table, scheduler = assets.load_base("cpu", root=root)
    unet.requires_grad_(False)
    subject = assets.load_subjects(root)[0]
    cond = assets.encode_prompt(table, subject.prompt)[0]
    data = methods.InitData(unet, scheduler, subject.train_views, cond, {})
    labels = ["default", "cntlora-self-vas@base=residual"]
    made = methods.init_adapters(data, labels, "attention+conv", [0], r=2, alpha=2)
    adapters = [made[(label, 0)] for label in labels]
    assert any(a.delta is not None for a in adapters[1].layers.values())
    assert len({a.rank for a in adapters[1].layers.values()}) > 1
    models = []
    for a in adapters:
        ranks = {n: la.rank for n, la in a.layers.items() if la.rank > 0}
        cfg = LoraConfig(target_modules=list(ranks), r=2, lora_alpha=2, rank_pattern=ranks,
                         alpha_pattern={n: a.layers[n].scale * r for n, r in ranks.items()})
        pm = get_peft_model(copy.deepcopy(unet), cfg)
        layers = dict(pm.base_model.model.named_modules())
        with torch.no_grad():
            for n, la in a.layers.items():
                if la.rank == 0:
                    continue
                layers[n].lora_A["default"].weight.copy_(la.A.reshape(layers[n].lora_A["default"].weight.shape))
                layers[n].lora_B["default"].weight.copy_(la.B.reshape(layers[n].lora_B["default"].weight.shape))
                if la.delta is not None:
                    layers[n].get_base_layer().weight.add_(la.delta)
        models.append(pm)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    t, enc, lrs = torch.randint(0, 1000, (4,), generator=g), cond.detach().expand(4, -1, -1), [1e-2, 3e-2]
    stacks = install(unet, adapters)
    opt = StackedAdamW([p for s in stacks for p in (s.A, s.B)], lrs)
    for _ in range(2):
        opt.zero_grad()
        (unet(x, t, encoder_hidden_states=enc).sample - target).pow(2).reshape(2, -1).mean(1).sum().backward()
        opt.step()
    stacked = unet(x, t, encoder_hidden_states=enc).sample.detach()
    remove(unet, stacks)
    for k, pm in enumerate(models):
        params = [p for n, p in pm.named_parameters() if "lora_" in n]
        sgd = torch.optim.AdamW(params, lr=lrs[k], weight_decay=1e-2)
        s = slice(2 * k, 2 * k + 2)
        for _ in range(2):
            sgd.zero_grad()
            (pm(x[s], t[s], encoder_hidden_states=enc[s]).sample - target[s]).pow(2).mean().backward()
            sgd.step()
        ref = pm(x[s], t[s], encoder_hidden_states=enc[s]).sample.detach()
        assert torch.allclose(ref, stacked[s], atol=1e-4)
