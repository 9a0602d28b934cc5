"""Train the fidelity encoder and measure how well it tells items apart.

    python -m bench.diffusion.encoder --out bench/diffusion/artifacts --results bench/results/diffusion

A small CNN (``models.FidelityEncoder``) learns instance discrimination on the
Fashion-MNIST training split with a SimCLR loss (NT-Xent): two augmented views of each
item (shifts of up to ±2 px, horizontal flips, scale 0.9–1.1, contrast gain 0.8–1.2)
must find each other among all views of the batch, so other items of the same class are
pushed away as much as items of other classes.

Validation, on test-split items the encoder never saw: each item gets two views under
fixed augmentations; the AUC of cosine similarity separating same-item view pairs from
other-item pairs, against all other items and against other items of the same class,
plus top-1 retrieval of an item's second view among all second views. Both the head
output and the backbone features are measured; the one with the higher same-class AUC
becomes the encoder's embedding.

Writes to ``--out``: ``encoder.safetensors`` (fp16), ``encoder_config.json``; to
``--results``: ``encoder.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import assets, data, models, runtime

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diffusion"
VIEW_RANGES = {"shift": 2, "flip_p": 0.5, "scale": (0.9, 1.1), "gain": (0.8, 1.2)}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options.

    Args:
        argv: the arguments; ``sys.argv[1:]`` by default.

    Returns:
        The parsed namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(assets.ARTIFACTS))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=512, help="items per step (two views each)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=150.0, help="cap on training wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--eval-items", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=250)
    return p.parse_args(argv)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's contrastive loss for 2B embeddings where rows i and i+B are one item's views.

    Args:
        z: (2B, D) embeddings (normalised inside).
        temperature: softmax temperature.

    Returns:
        The scalar loss.
    """
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of scores: P(pos > neg) + P(pos == neg) / 2.

    Args:
        pos: scores of positive pairs (1-D).
        neg: scores of negative pairs (1-D).

    Returns:
        The AUC in [0, 1].
    """
    neg_sorted = torch.sort(neg.double().flatten()).values
    pos = pos.double().flatten()
    below = torch.searchsorted(neg_sorted, pos, right=False).double()
    upto = torch.searchsorted(neg_sorted, pos, right=True).double()
    return float(((below + upto) / 2).sum() / (len(pos) * len(neg_sorted)))


def view_pairs(n_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed validation draw: which test items, and two augmentation rows each.

    Args:
        n_items: how many test items.
        seed: seed of the CPU generator.

    Returns:
        (test indices (n,), params of view one (n, 5), params of view two (n, 5)).
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(10000, generator=g)[:n_items]
    return idx, data.random_aug_params(n_items, g, **VIEW_RANGES), data.random_aug_params(n_items, g, **VIEW_RANGES)


@torch.no_grad()
def validate(encoder: models.FidelityEncoder, n_items: int = 2000, seed: int = 123,
             device: torch.device | str = "cpu") -> dict:
    """Same-item vs other-item separation on held-out test items.

    Args:
        encoder: the encoder (its ``features`` are used, both heads measured).
        n_items: test items; each gives one positive pair and n_items - 1 negatives per view.
        seed: the fixed draw of items and augmentations (``view_pairs``).
        device: where to run it.

    Returns:
        ``{"head": {...}, "backbone": {...}, "items": n, "seed": seed}`` where each inner
        dict has ``auc_all``, ``auc_same_class``, ``retrieval_top1``, mean similarities and
        pair counts.
    """
    images, labels = data.load_fashion_mnist("test")
    idx, p1, p2 = view_pairs(n_items, seed)
    x = data.to_model_space(images[idx]).to(device)
    y = labels[idx]
    v1, v2 = data.augment(x, p1), data.augment(x, p2)
    was_training = encoder.training
    encoder.eval()
    feats = {"backbone": ([], []), "head": ([], [])}
    for s in range(0, n_items, 500):
        for k, v in enumerate((v1, v2)):
            h, z = encoder.features(v[s:s + 500].float())
            feats["backbone"][k].append(F.normalize(h.float(), dim=1).cpu())
            feats["head"][k].append(F.normalize(z.float(), dim=1).cpu())
    encoder.train(was_training)
    out = {"items": n_items, "seed": seed, "view_ranges": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in VIEW_RANGES.items()}}
    same = (y[:, None] == y[None, :])
    off = ~torch.eye(n_items, dtype=torch.bool)
    for name, (a, b) in feats.items():
        a, b = torch.cat(a), torch.cat(b)
        sim = a @ b.T
        pos = sim.diagonal()
        neg_all, neg_same = sim[off], sim[off & same]
        out[name] = {"auc_all": round(auc(pos, neg_all), 5), "auc_same_class": round(auc(pos, neg_same), 5),
                     "retrieval_top1": round(float((sim.argmax(1) == torch.arange(n_items)).float().mean()), 4),
                     "mean_sim_same_item": round(float(pos.mean()), 4),
                     "mean_sim_same_class_other_item": round(float(neg_same.mean()), 4),
                     "mean_sim_other_class": round(float(sim[off & ~same].mean()), 4),
                     "pairs": {"positive": int(pos.numel()), "negative_all": int(neg_all.numel()),
                               "negative_same_class": int(neg_same.numel())}}
    return out


def main(argv=None) -> dict:
    """Train, validate and save the encoder.

    Args:
        argv: command-line arguments (see ``parse_args``).

    Returns:
        The record written to ``encoder.json``.
    """
    from safetensors.torch import save_file

    args = parse_args(argv)
    t_start = runtime.now()
    runtime.make_deterministic(args.seed)
    device = runtime.pick_device(args.device)
    env = runtime.environment()
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)

    images_u8, _ = data.load_fashion_mnist("train")
    if args.train_limit:
        images_u8 = images_u8[:args.train_limit]
    images = data.to_model_space(images_u8).to(device)
    n_train = images.shape[0]

    torch.manual_seed(args.seed)
    enc = models.FidelityEncoder(width=args.width, proj_dim=args.proj_dim).to(device)
    n_params = sum(p.numel() for p in enc.parameters())
    print(f"encoder parameters: {n_params:,}", flush=True)
    opt = torch.optim.AdamW(enc.parameters(), lr=args.lr, weight_decay=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    use_bf16 = device.type == "cuda"
    perm, pos, step = None, n_train, 0
    curve, stopped_by_time = [], False
    loss_acc, acc_n = torch.zeros((), device=device), 0
    runtime.sync(device)
    t0 = runtime.now()
    while step < args.steps:
        if pos + args.batch_size > n_train:
            perm, pos = torch.randperm(n_train, generator=gen, device=device), 0
        x = images[perm[pos:pos + args.batch_size]]
        pos += args.batch_size
        b = x.shape[0]
        views = torch.cat([data.augment(x, data.random_aug_params(b, gen, **VIEW_RANGES)),
                           data.augment(x, data.random_aug_params(b, gen, **VIEW_RANGES))])
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, z = enc.features(views)
        loss = nt_xent(z, args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_acc += loss.detach()
        acc_n += 1
        step += 1
        if step % args.log_every == 0 or step == args.steps or step == 50:
            mean = (loss_acc / acc_n).item()
            loss_acc.zero_()
            acc_n = 0
            curve.append({"step": step, "loss": round(mean, 5), "seconds": round(runtime.now() - t0, 2)})
            print(f"step {step}/{args.steps} loss {mean:.4f} elapsed {runtime.now() - t0:.1f}s", flush=True)
        if runtime.now() - t0 > args.max_seconds and step < args.steps:
            stopped_by_time = True
            print(f"stopping at step {step}: training time cap reached", flush=True)
            break
    runtime.sync(device)
    train_seconds = runtime.now() - t0

    metrics = validate(enc, args.eval_items, device=device)
    choice = "head" if metrics["head"]["auc_same_class"] >= metrics["backbone"]["auc_same_class"] else "backbone"
    enc.embedding = choice
    enc.config["embedding"] = choice
    path = out / "encoder.safetensors"
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in enc.state_dict().items()},
              str(path), metadata={"format": "pt", "embedding": choice, "steps": str(step)})
    (out / "encoder_config.json").write_text(json.dumps(enc.config, indent=2) + "\n")
    # the saved fp16 weights, read back, are what the benchmark uses: validate those too
    saved = validate(assets.load_encoder(device, root=out), args.eval_items, device=device)[choice]
    print(f"validation ({choice}, saved fp16): {saved}", flush=True)

    record = {
        "command": "python -m bench.diffusion.encoder " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "environment": env, "parameters": n_params,
        "steps_done": step, "stopped_by_time": stopped_by_time,
        "train_seconds": round(train_seconds, 2),
        "gpu_seconds": round(train_seconds, 2) if device.type == "cuda" else 0.0,
        "loss_curve": curve, "embedding": choice, "validation_fp32": metrics, "validation_saved": saved,
        "auc_all": saved["auc_all"], "auc_same_class": saved["auc_same_class"],
        "encoder_bytes": path.stat().st_size, "wall_seconds": round(runtime.now() - t_start, 2),
    }
    runtime.write_json(results / "encoder.json", record)
    return record


if __name__ == "__main__":
    main()
