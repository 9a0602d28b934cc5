"""Choose the benchmark's subjects and make their fixed views.

    python -m bench.diffusion.subjects --out bench/diffusion/artifacts --results bench/results/diffusion

Each subject is one item of the Fashion-MNIST **test** split (never seen in pre-training),
one per class in ``--classes``, bound to its own rare token. Per class, ``--candidates``
items are drawn with a fixed seed and the most distinctive is kept: the one whose
fidelity-encoder embedding has the lowest maximum cosine similarity to any other test item
of its class (a subject that has a near-twin in its class cannot be told apart from it).

Views are small fixed augmentations (``data.augment``: integer shifts of up to ±2 px,
horizontal flip, scale 0.9–1.1, contrast gain 0.85–1.15), drawn from recorded seeds:
``--train-views`` views to fine-tune on (the first is the item itself) and
``--heldout-views`` others kept for scoring.

Writes to ``--out``: ``subjects.safetensors`` and the manifest ``subjects.json``; to
``--results``: ``subjects.png`` (a row per subject: item, training views, held-out views)
and ``subjects_check.json`` (how the encoder scores held-out views against training views
and against other items of the same class).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import assets, data, runtime, tokens
from . import encoder as encoder_script

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diffusion"
DEFAULT_CLASSES = (0, 2, 3, 4, 5, 7, 8, 9)  # all but trouser and shirt
VIEW_RANGES = {"shift": 2, "flip_p": 0.5, "scale": (0.9, 1.1), "gain": (0.85, 1.15)}


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
    p.add_argument("--encoder-root", default=None, help="folder of the fidelity encoder (default: --out)")
    p.add_argument("--classes", type=int, nargs="+", default=list(DEFAULT_CLASSES))
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--train-views", type=int, default=5)
    p.add_argument("--heldout-views", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def embed(enc, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Encoder embeddings in batches.

    Args:
        enc: the fidelity encoder.
        images: (N, 1, 32, 32) in [-1, 1].
        batch_size: images per call.

    Returns:
        (N, D) unit vectors.
    """
    return torch.cat([enc(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])


def main(argv=None) -> dict:
    """Choose subjects, make and save their views, check them with the encoder.

    Args:
        argv: command-line arguments (see ``parse_args``).

    Returns:
        The manifest written to ``subjects.json``.

    Raises:
        ValueError: with more classes than rare tokens.
    """
    from safetensors.torch import save_file

    args = parse_args(argv)
    if len(args.classes) > len(tokens.RARE_TOKENS):
        raise ValueError(f"{len(args.classes)} classes but only {len(tokens.RARE_TOKENS)} rare tokens")
    runtime.make_deterministic(args.seed)
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    enc = assets.load_encoder("cpu", root=args.encoder_root or out)
    images_u8, labels = data.load_fashion_mnist("test")
    images = data.to_model_space(images_u8)

    tensors, entries, check, rows, row_labels = {}, [], [], [], []
    for i, c in enumerate(args.classes):
        token, name = tokens.RARE_TOKENS[i], tokens.CLASS_NAMES[c]
        key = f"{token}-{name}"
        members = torch.nonzero(labels == c).flatten()
        z = embed(enc, images[members])
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        g = torch.Generator().manual_seed(args.seed * 1000 + c)
        cand = torch.randperm(len(members), generator=g)[:args.candidates]
        max_sim = sim[cand].max(1).values
        best = int(cand[int(max_sim.argmin())])
        index = int(members[best])

        item = images[index:index + 1]
        g_train = torch.Generator().manual_seed(10_000 + 100 * i + args.seed)
        g_held = torch.Generator().manual_seed(10_000 + 100 * i + args.seed + 1)
        train_params = torch.cat([data.identity_params(1),
                                  data.random_aug_params(args.train_views - 1, g_train, **VIEW_RANGES)])
        held_params = data.random_aug_params(args.heldout_views, g_held, **VIEW_RANGES)
        train_views = data.augment(item.repeat(args.train_views, 1, 1, 1), train_params)
        held_views = data.augment(item.repeat(args.heldout_views, 1, 1, 1), held_params)
        tensors.update({f"{key}.image": item[0].contiguous(), f"{key}.train_views": train_views.contiguous(),
                        f"{key}.heldout_views": held_views.contiguous(),
                        f"{key}.train_params": train_params.contiguous(),
                        f"{key}.heldout_params": held_params.contiguous()})
        entries.append({
            "name": key, "token": token, "label": c, "class_name": name, "test_index": index,
            "prompt": tokens.subject_prompt(token, c), "class_prompt": tokens.class_prompt(c),
            "selection": {"candidates": [int(members[j]) for j in cand],
                          "max_same_class_similarity": [round(float(v), 4) for v in max_sim]},
            "train_params": [[round(float(v), 6) for v in r] for r in train_params],
            "heldout_params": [[round(float(v), 6) for v in r] for r in held_params],
        })

        # fidelity check: held-out views vs training views, and other same-class items vs training views
        zt, zh = embed(enc, train_views), embed(enc, held_views)
        others = members[members != index]
        other_pick = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(c))[:200]]
        zo = embed(enc, images[other_pick])
        pos = (zh @ zt.T).mean(1)
        neg = (zo @ zt.T).mean(1)
        check.append({"name": key, "test_index": index,
                      "heldout_vs_train_mean_sim": round(float(pos.mean()), 4),
                      "same_class_others_vs_train_mean_sim": round(float(neg.mean()), 4),
                      "same_class_others_vs_train_max_sim": round(float(neg.max()), 4),
                      "auc_heldout_vs_same_class_others": round(encoder_script.auc(pos, neg), 4)})
        rows.append(torch.cat([item, train_views, held_views]))
        row_labels.append(f"{token} {name} #{index}")
        print(check[-1], flush=True)

    save_file(tensors, str(out / "subjects.safetensors"), metadata={"format": "pt"})
    manifest = {"dataset": "Fashion-MNIST test split", "view_ranges": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in VIEW_RANGES.items()},
                "augmentation_row": list(data.AUG_FIELDS), "train_views": args.train_views,
                "heldout_views": args.heldout_views, "seed": args.seed,
                "selection_rule": "per class, the least similar (max encoder cosine to any other same-class test "
                                  "item) of the seeded candidates",
                "command": "python -m bench.diffusion.subjects " + " ".join(sys.argv[1:] if argv is None else argv),
                "subjects": entries}
    runtime.write_json(out / "subjects.json", manifest)
    runtime.write_json(results / "subjects_check.json", {"subjects": check})
    data.save_grid(results / "subjects.png", rows, row_labels)
    return manifest


if __name__ == "__main__":
    main()
