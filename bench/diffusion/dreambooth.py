"""DreamBooth on the Fashion-MNIST denoiser: every LoRA init fine-tuned under one protocol.

Each subject's LoRA is trained on its instance views under the instance prompt [rare, class],
with prior preservation on class images the base model generated for the class prompt [class]
(made once per class, seeded, cached). Every method gets the same rank budget, data order,
noise and timesteps per (subject, seed), optimizer (AdamW) and steps; only its init and its
lr (picked on the development seed by validation-view fidelity) differ.

Runs that share a target set are trained together: one forward pass carries K runs
(dreambooth_stack), so a small denoiser keeps the accelerator busy. The plan (which runs,
in which phase) is dreambooth_plan; this module trains and evaluates a group of runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from cntlora.training import batch_order

from . import assets, metrics
from .dreambooth_stack import Adapter, StackedAdamW, install, remove
from .methods import InitData, init_adapters, noisy_batch

PRIOR_SEED = 1000  # class-prior images of class c come from seed PRIOR_SEED + c
FASHION_SEED = 2000  # the true pre-training sample behind @fashion
EVAL_SEED = 3000  # the fixed (noise, timestep) draws of the denoising-loss evaluation


@dataclass
class Protocol:
    """The fine-tuning and evaluation settings every method shares."""

    steps: int = 200
    instance_batch: int = 2
    prior_batch: int = 2
    prior_weight: float = 1.0
    r: int = 8
    alpha: float = 8.0
    weight_decay: float = 1e-2
    fidelity_at: tuple = (25, 50, 100, 200)  # checkpoints where samples are drawn and scored
    loss_every: int = 25
    samples: int = 8  # instance-prompt samples per run and checkpoint
    class_samples: int = 8
    other_samples: int = 4  # per other class
    other_classes: int = 2
    sample_steps: int = 20
    guidance: float = assets.DEFAULT_GUIDANCE
    eval_draws: int = 16  # (view, noise, timestep) draws per split
    prior_count: int = 100
    prior_steps: int = 50  # DDIM steps of the class-prior images
    fashion_count: int = 100
    max_runs: int = 48  # runs per forward pass
    bf16: bool = True  # bfloat16 autocast on CUDA (as the denoiser was pre-trained)

    def checkpoints(self) -> List[int]:
        marks = set(range(0, self.steps + 1, self.loss_every)) | {self.steps} | set(self.fidelity_at)
        return sorted(m for m in marks if m <= self.steps)


@dataclass(frozen=True)
class RunSpec:
    target_set: str
    label: str
    subject: str
    seed: int
    lr: float
    phase: str = "dev"

    def pair(self) -> str:
        return metrics.pair_key(self.subject, self.seed)


def _mix(*parts: int) -> int:
    """A stable seed from several integers."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return h


class Bench:
    """What every group of runs shares: the base denoiser, prompts, encoder, subjects, priors, references."""

    def __init__(self, protocol: Protocol, device, cache: Path, root: Optional[Path] = None):
        self.p, self.device = protocol, torch.device(device)
        self.unet, self.table, self.scheduler = assets.load_base(self.device, torch.float32, root=root)
        self.unet.requires_grad_(False)
        self.table.requires_grad_(False)
        self.encoder = assets.load_encoder(self.device, root=root)
        self.subjects = {s.name: s for s in assets.load_subjects(root)}
        self.sampler = metrics.ddim(self.scheduler)
        self.priors = load_or_make_priors(self, cache)
        self.fashion = load_or_make_fashion(protocol, cache)
        self.uncond = self.cond([])
        self._base: Dict[tuple, tuple] = {}
        self._view_feats: Dict[tuple, torch.Tensor] = {}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.p.bf16 and self.device.type == "cuda")

    def predict(self, x: torch.Tensor, t: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """The denoiser's output (float32) under the benchmark's autocast."""
        with self.autocast():
            return self.unet(x, t, encoder_hidden_states=enc).sample.float()

    def cond(self, prompt) -> torch.Tensor:
        return assets.encode_prompt(self.table, prompt)[0].detach()

    def views(self, name: str, split: str) -> torch.Tensor:
        """A subject's "train" views, or its held-out views halved into "val" (first half) and "test"."""
        s = self.subjects[name]
        if split == "train":
            return s.train_views
        half = s.heldout_views.shape[0] // 2
        return s.heldout_views[:half] if split == "val" else s.heldout_views[half:]

    def view_feats(self, name: str, split: str) -> torch.Tensor:
        if (name, split) not in self._view_feats:
            self._view_feats[(name, split)] = metrics.embed(self.encoder, self.views(name, split).to(self.device))
        return self._view_feats[(name, split)]

    def other_labels(self, label: int) -> List[int]:
        return [(label + 1 + i) % 10 for i in range(self.p.other_classes)]

    def init_data(self, name: str) -> InitData:
        s = self.subjects[name]
        dev = self.device
        refs = {"prior": lambda: (self.priors[s.label].to(dev), self.cond(s.class_prompt).unsqueeze(0)),
                "fashion": lambda: (self.fashion[0].to(dev),
                                    torch.stack([self.cond([assets.tokens.CLASS_NAMES[int(c)]]) for c in self.fashion[1]]))}
        return InitData(self.unet, self.scheduler, s.train_views.to(dev), self.cond(s.prompt), refs)

    def base_samples(self, seed: int, label: int, n: int) -> tuple:
        """The base model's class-prompt samples from the noise a run with this seed uses, with their features."""
        key = (seed, label, n)
        if key not in self._base:
            noise = self.noise(seed, label, n).unsqueeze(0).to(self.device)
            cond = self.cond([assets.tokens.CLASS_NAMES[label]]).expand(1, n, -1, -1)
            x = metrics.sample(self.predict, self.sampler, noise, cond, self.uncond, self.p.sample_steps, self.p.guidance)[0]
            self._base[key] = (x, metrics.embed(self.encoder, x))
        return self._base[key]

    def noise(self, seed: int, stream: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(seed, stream, 77))
        return torch.randn(n, 1, 32, 32, generator=g)


def load_or_make_priors(bench: Bench, cache: Path) -> Dict[int, torch.Tensor]:
    """Class-prior images for every subject's class: generated by the base model once, then read from `cache`."""
    from safetensors.torch import load_file, save_file

    path = Path(cache) / f"priors_{bench.p.prior_count}_{bench.p.prior_steps}.safetensors"
    have = load_file(str(path)) if path.exists() else {}
    labels = sorted({s.label for s in bench.subjects.values()})
    missing = [c for c in labels if str(c) not in have]
    for c in missing:
        images = assets.sample_images(bench.unet, bench.table, bench.scheduler, [assets.tokens.CLASS_NAMES[c]],
                                      bench.p.prior_count, seed=PRIOR_SEED + c, steps=bench.p.prior_steps,
                                      guidance=bench.p.guidance)
        have[str(c)] = images.half().contiguous()
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(have, str(path))
    return {int(k): v.float() for k, v in have.items()}


def load_or_make_fashion(protocol: Protocol, cache: Path) -> tuple:
    """The true pre-training sample (images, labels), read from `cache` when there."""
    from safetensors.torch import load_file, save_file

    path = Path(cache) / f"fashion_{protocol.fashion_count}.safetensors"
    if not path.exists():
        images, labels = assets.fashion_sample(protocol.fashion_count, FASHION_SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(path))
    t = load_file(str(path))
    return t["images"].float(), t["labels"].long()


def _stacked(predict, x: torch.Tensor, t: torch.Tensor, enc: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Denoiser outputs for (K, n, ...) inputs, n split in chunks so the stack always sees all K runs."""
    k, n = x.shape[:2]
    outs = []
    for i in range(0, n, chunk):
        c = min(chunk, n - i)
        out = predict(x[:, i : i + c].reshape(k * c, *x.shape[2:]), t[:, i : i + c].reshape(-1),
                      enc[:, i : i + c].reshape(k * c, *enc.shape[2:]))
        outs.append(out.reshape(k, c, *out.shape[1:]))
    return torch.cat(outs, 1)


class Group:
    """K runs of one target set, trained in one stack."""

    def __init__(self, bench: Bench, specs: Sequence[RunSpec], adapters: Sequence[Adapter]):
        self.b, self.specs, self.k = bench, list(specs), len(specs)
        p, dev = bench.p, bench.device
        self.names = sorted({s.subject for s in specs})
        # one bank of clean images: every subject's training views, then every class's priors
        banks, offset, self.view_at, self.prior_at = [], 0, {}, {}
        for n in self.names:
            self.view_at[n] = offset
            banks.append(bench.views(n, "train"))
            offset += banks[-1].shape[0]
        for c in sorted({bench.subjects[n].label for n in self.names}):
            self.prior_at[c] = offset
            banks.append(bench.priors[c])
            offset += banks[-1].shape[0]
        self.bank = torch.cat(banks).to(dev)
        per = p.instance_batch + p.prior_batch
        idx = torch.empty(p.steps, self.k * per, dtype=torch.long)
        for k, s in enumerate(specs):
            subj = bench.subjects[s.subject]
            inst = torch.tensor(batch_order(bench.views(s.subject, "train").shape[0], p.steps, p.instance_batch, s.seed))
            prior = torch.tensor(batch_order(bench.priors[subj.label].shape[0], p.steps, p.prior_batch, _mix(s.seed, 1)))
            idx[:, k * per : k * per + p.instance_batch] = inst + self.view_at[s.subject]
            idx[:, k * per + p.instance_batch : (k + 1) * per] = prior + self.prior_at[subj.label]
        self.idx = idx.to(dev)
        conds = [torch.stack([bench.cond(bench.subjects[s.subject].prompt)] * p.instance_batch
                             + [bench.cond(bench.subjects[s.subject].class_prompt)] * p.prior_batch) for s in specs]
        self.enc = torch.cat(conds)
        self.keys = sorted({(s.subject, s.seed) for s in specs})
        self.key_of = torch.tensor([self.keys.index((s.subject, s.seed)) for s in specs])
        order = sorted(bench.subjects)
        self.gens = [torch.Generator().manual_seed(_mix(seed, order.index(n), 11)) for n, seed in self.keys]
        self.stacks = install(bench.unet, adapters)
        self.opt = StackedAdamW([q for st in self.stacks for q in (st.A, st.B)], [s.lr for s in specs],
                                weight_decay=p.weight_decay)

    def close(self) -> None:
        remove(self.b.unet, self.stacks)

    def step(self, step: int) -> torch.Tensor:
        """One AdamW step of every run; returns the K losses (on the device)."""
        p, dev = self.b.p, self.b.device
        per = p.instance_batch + p.prior_batch
        draws = [(torch.randn(per, 1, 32, 32, generator=g),
                  torch.randint(0, self.b.scheduler.config.num_train_timesteps, (per,), generator=g)) for g in self.gens]
        noise = torch.stack([d[0] for d in draws])[self.key_of].reshape(self.k * per, 1, 32, 32).to(dev)
        t = torch.stack([d[1] for d in draws])[self.key_of].reshape(-1).to(dev)
        batch = noisy_batch(self.b.scheduler, self.bank[self.idx[step]], self.enc, noise, t)
        pred = self.b.predict(batch["sample"], batch["timestep"], batch["encoder_hidden_states"])
        err = (pred.float() - batch["target"].float()).pow(2).reshape(self.k, per, -1).mean(-1)
        losses = err[:, : p.instance_batch].mean(1) + p.prior_weight * err[:, p.instance_batch :].mean(1)
        self.opt.zero_grad()
        losses.sum().backward()
        self.opt.step()
        return losses.detach()


def eval_draws(bench: Bench, name: str) -> dict:
    """The fixed denoising problems of one subject: per split, `eval_draws` (view, noise, timestep) draws."""
    g = torch.Generator().manual_seed(_mix(EVAL_SEED, sorted(bench.subjects).index(name)))
    out = {}
    for split in ("train", "val", "test"):
        views = bench.views(name, split)
        n = bench.p.eval_draws
        pick = torch.arange(n) % views.shape[0]
        t = torch.randint(0, bench.scheduler.config.num_train_timesteps, (n,), generator=g)
        out[split] = (views[pick], torch.randn(n, 1, 32, 32, generator=g), t)
    return out


@torch.no_grad()
def denoising_losses(group: Group, draws: Dict[str, dict]) -> Dict[str, List[float]]:
    """Per split, each run's mean denoising loss on its subject's fixed draws."""
    b, out = group.b, {}
    for split in ("train", "val", "test"):
        x0 = torch.stack([draws[s.subject][split][0] for s in group.specs]).to(b.device)
        noise = torch.stack([draws[s.subject][split][1] for s in group.specs]).to(b.device)
        t = torch.stack([draws[s.subject][split][2] for s in group.specs]).to(b.device)
        enc = torch.stack([b.cond(b.subjects[s.subject].prompt).expand(x0.shape[1], -1, -1) for s in group.specs])
        k, n = x0.shape[:2]
        batch = noisy_batch(b.scheduler, x0.flatten(0, 1), enc.flatten(0, 1), noise.flatten(0, 1), t.flatten())
        pred = _stacked(b.predict, batch["sample"].reshape(k, n, 1, 32, 32), t, enc)
        out[split] = (pred.float() - batch["target"].reshape(k, n, 1, 32, 32)).pow(2).flatten(1).mean(1).tolist()
    return out


@torch.no_grad()
def fidelity_scores(group: Group, keep: Sequence[int] = ()) -> tuple:
    """Each run's instance-prompt samples scored against its validation and test views; samples of runs in `keep`."""
    b, p = group.b, group.b.p
    noise = torch.stack([b.noise(s.seed, 100 + b.subjects[s.subject].label, p.samples) for s in group.specs])
    cond = torch.stack([b.cond(b.subjects[s.subject].prompt).expand(p.samples, -1, -1) for s in group.specs])
    x = metrics.sample(b.predict, b.sampler, noise.to(b.device), cond, b.uncond, p.sample_steps, p.guidance)
    feats = metrics.embed(b.encoder, x)
    scores = {split: metrics.fidelity(feats, [b.view_feats(s.subject, split) for s in group.specs])
              for split in ("val", "test")}
    return scores, {i: x[i].cpu() for i in keep}


@torch.no_grad()
def drift_scores(group: Group) -> Dict[str, List[float]]:
    """Each run's class-prompt and other-class samples against the base model's from the same noise."""
    b, p = group.b, group.b.p
    out = {}
    for kind, n in (("class", p.class_samples), ("other", p.other_samples)):
        labels = [[b.subjects[s.subject].label] if kind == "class" else b.other_labels(b.subjects[s.subject].label)
                  for s in group.specs]
        noise = torch.stack([torch.cat([b.noise(s.seed, c, n) for c in ls]) for s, ls in zip(group.specs, labels)])
        cond = torch.stack([torch.cat([b.cond([assets.tokens.CLASS_NAMES[c]]).expand(n, -1, -1) for c in ls])
                            for ls in labels])
        x = metrics.sample(b.predict, b.sampler, noise.to(b.device), cond, b.uncond, p.sample_steps, p.guidance)
        feats = metrics.embed(b.encoder, x)
        base = [[b.base_samples(s.seed, c, n) for c in ls] for s, ls in zip(group.specs, labels)]
        base_x = torch.stack([torch.cat([q[0] for q in row]) for row in base])
        base_f = torch.stack([torch.cat([q[1] for q in row]) for row in base])
        d = metrics.drift(x, base_x, feats, base_f)
        out[f"drift_{kind}"], out[f"mse_{kind}"] = d["drift"], d["mse"]
    return out


def run_group(bench: Bench, specs: Sequence[RunSpec], fidelity_at: Optional[Sequence[int]] = None,
              keep_samples: Sequence[str] = (), deadline: Optional[float] = None) -> tuple:
    """Initialize and fine-tune runs of one target set; returns (result records, {run key: final samples}).

    fidelity_at: the checkpoints where fidelity is measured (the protocol's by default; the
    final step always). keep_samples: pair keys whose final instance samples are returned.
    """
    p = bench.p
    if len({s.target_set for s in specs}) != 1:
        raise ValueError("a group holds runs of one target set")
    t0 = time.perf_counter()
    if deadline is not None and time.time() > deadline:
        return [{**asdict(s), "steps": p.steps, "error": "skipped: the time budget ran out"} for s in specs], {}
    adapters: Dict[RunSpec, object] = {}
    for name in sorted({s.subject for s in specs}):
        mine = [s for s in specs if s.subject == name]
        made = init_adapters(bench.init_data(name), sorted({s.label for s in mine}), specs[0].target_set,
                             sorted({s.seed for s in mine}), p.r, p.alpha)
        adapters.update({s: made[(s.label, s.seed)] for s in mine})
    records = []
    for s in specs:
        a = adapters[s]
        rec = {**asdict(s), "steps": p.steps}
        if isinstance(a, Adapter):
            rec.update(trainable_params=a.trainable_params(), init_seconds=a.init_seconds, init_info=a.info)
        else:
            rec["error"] = a
        records.append(rec)
    ok = [i for i, s in enumerate(specs) if isinstance(adapters[s], Adapter)]
    samples = {}
    if not ok or (deadline is not None and time.time() > deadline):
        for r in records:
            r.setdefault("error", "skipped: the time budget ran out")
        return records, samples
    draws = {n: eval_draws(bench, n) for n in {specs[i].subject for i in ok}}
    for i in ok:  # the base model's drift references, before any adapter is installed
        s = specs[i]
        label = bench.subjects[s.subject].label
        for c, n in [(label, p.class_samples)] + [(c, p.other_samples) for c in bench.other_labels(label)]:
            bench.base_samples(s.seed, c, n)
    group = Group(bench, [specs[i] for i in ok], [adapters[specs[i]] for i in ok])
    marks = p.checkpoints()
    fid_marks = set(p.fidelity_at if fidelity_at is None else fidelity_at) | {p.steps}
    keep = [j for j, i in enumerate(ok) if specs[i].pair() in keep_samples]
    try:
        curves = {i: {"eval_loss": {"train": {}, "val": {}, "test": {}}, "fidelity": {}, "fidelity_val": {}} for i in ok}
        losses = []
        for step in range(p.steps + 1):
            if step in marks:
                ev = denoising_losses(group, draws)
                for j, i in enumerate(ok):
                    for split in ev:
                        curves[i]["eval_loss"][split][str(step)] = ev[split][j]
            if step in fid_marks:
                fid, kept = fidelity_scores(group, keep if step == p.steps else ())
                for j, i in enumerate(ok):
                    curves[i]["fidelity"][str(step)] = fid["test"][j]
                    curves[i]["fidelity_val"][str(step)] = fid["val"][j]
                samples.update({f"{specs[ok[j]].target_set}|{specs[ok[j]].label}|{specs[ok[j]].pair()}": x
                                for j, x in kept.items()})
            if step < p.steps:
                losses.append(group.step(step))
        train = torch.stack(losses).cpu().T.tolist()
        final = drift_scores(group)
    finally:
        group.close()
    seconds = (time.perf_counter() - t0) / len(specs)
    for j, i in enumerate(ok):
        records[i].update(curves[i], train_loss=[round(v, 5) for v in train[j]], seconds=seconds,
                          **{k: v[j] for k, v in final.items()})
    return records, samples
