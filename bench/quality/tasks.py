"""The benchmark's tasks, built from cntlora.zoo's packaged models and data.

make_task(name, quick=False, train_size=None) -> task.Task. Names: "vision", "text" and
"lm" (about 800 training examples or windows), their few-shot versions "vision-fewshot",
"text-fewshot" and "lm-fewshot" (100), and "tiny" (a randomly initialized BERT on synthetic
tokens: no packages needed, for the CI smoke test).

$CNTLORA_BENCH_DATA, when set, names a folder written by `python -m bench.quality.export_data`; the
tasks then read the models and data from it instead of the installed packages (the GPU
machine has none of them). The lm tasks read it only when it holds smollm2/ (--only lm).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import convs_to_linear
from .task import Task

SPLIT_SEED = 1234  # fixes which examples are train / val / test, independent of the run seeds
TRAIN_SIZE = 800
FEWSHOT_SIZE = 100
QUICK_SIZE = 16


def _exported() -> Path | None:
    folder = os.environ.get("CNTLORA_BENCH_DATA")
    return Path(folder) if folder else None


def _fresh_head_builder(template: nn.Module, reset_head):
    """A model factory: a copy of `template` whose new head is re-initialized from the seed."""

    def build(seed):
        model = copy.deepcopy(template)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reset_head(model)
        return model

    return build


def _reference_photos():
    """uint8 N×3×64×64 pre-training-like photos (zoo.reference_photos) from the exported folder, else from the
    installed scikit-image and scikit-learn; None where neither has them (the task then has no reference set)."""
    from cntlora import zoo

    folder = _exported()
    if folder is not None and (folder / "reference_photos.pt").exists():
        return torch.load(folder / "reference_photos.pt", weights_only=True)
    try:
        return zoo.reference_photos()
    except RuntimeError:  # a package is missing
        return None


def _reference_texts() -> list:
    """Generic English paragraphs (zoo.reference_texts) from the exported folder, else from this Python's stdlib;
    empty where a stripped-down Python lacks its docs (the task then has no reference set)."""
    from cntlora import zoo

    folder = _exported()
    if folder is not None and (folder / "reference_texts.json").exists():
        return json.loads((folder / "reference_texts.json").read_text())
    try:
        return zoo.reference_texts()
    except (ImportError, RuntimeError):
        return []


def _split(n: int, val: int, test: int, pool: int):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return perm[:val], perm[val : val + test], perm[val + test : val + test + pool]


def _sizes(quick: bool, train_size, default_val, default_test):
    if quick:
        return QUICK_SIZE, QUICK_SIZE, QUICK_SIZE
    return train_size or TRAIN_SIZE, default_val, default_test


def _name(kind, quick, train_size):
    name = kind if (train_size or TRAIN_SIZE) > FEWSHOT_SIZE else f"{kind}-fewshot"
    return f"{name}-quick" if quick else name


def accuracy(model, batches) -> float:
    right = total = 0
    for batch in batches:
        batch = _to(batch, model)
        if isinstance(batch, dict):
            logits, y = model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]
        else:
            logits, y = model(batch[0]), batch[1]
        right += int((logits.argmax(-1) == y).sum())
        total += len(y)
    return right / total


def perplexity(model, batches) -> float:
    nll = tokens = 0.0
    for batch in batches:
        batch = _to(batch, model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"))
        tokens += target.numel()
    return math.exp(nll / tokens)


def _to(batch, model):
    from cntlora.batches import to_device

    return to_device(batch, next(model.parameters()).device)


def _dict_loss(model, batch):
    return model(**batch).loss


def _image_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


# -----------------------------------------------------------------------------
# text: all-MiniLM-L6-v2 + BBC News (5 classes)

TEXT_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]


def _minilm_and_bbc():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _exported()
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder / "minilm")
        model = AutoModelForSequenceClassification.from_pretrained(folder / "minilm", num_labels=5, dtype=torch.float32)
        data = json.loads((folder / "bbc.json").read_text())
        return model, tokenizer, data["texts"], data["labels"]
    from cntlora import zoo

    model, tokenizer = zoo.load_minilm(num_labels=5)
    texts, labels, _ = zoo.bbc_news()
    return model, tokenizer, texts, labels


def text_task(quick=False, train_size=None, max_length=128) -> Task:
    template, tokenizer, texts, labels = _minilm_and_bbc()
    template.eval()
    n_train, n_val, n_test = _sizes(quick, train_size, 200, 1000)
    val_idx, test_idx, pool = _split(len(texts), n_val, n_test, 1025)
    ids = lambda idx: [(tokenizer(texts[i], truncation=True, max_length=max_length)["input_ids"], labels[i]) for i in idx]
    pad = tokenizer.pad_token_id or 0

    def collate(examples):
        width = max(len(x) for x, _ in examples)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (x, _) in enumerate(examples):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in examples])}

    build = _fresh_head_builder(template, lambda model: model.classifier.reset_parameters())
    batch_size, calibration_size = (8, QUICK_SIZE) if quick else (16, 64)
    reference = [(tokenizer(t, truncation=True, max_length=max_length)["input_ids"], 0)
                 for t in _reference_texts()[:calibration_size]]

    return Task(
        name=_name("text", quick, train_size),
        build_model=build, target_modules=TEXT_TARGETS,
        train=ids(pool[:n_train]), val=ids(val_idx), test=ids(test_idx), collate=collate,
        loss_fn=_dict_loss, metric_fn=accuracy, metric="accuracy", higher_is_better=True,
        lora_kwargs={"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": ["classifier"]},
        batch_size=batch_size, calibration_size=calibration_size,
        reference_batches=[collate(reference[i:i + batch_size]) for i in range(0, len(reference), batch_size)],
    )


# -----------------------------------------------------------------------------
# vision: MobileNetV2 (ImageNet) + Fashion-MNIST, LoRA on every 1×1 conv


def pointwise_convs(model: nn.Module) -> list:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)]


def _mobilenet_and_fashion():
    from cntlora import zoo

    folder = _exported()
    if folder is not None:
        model = zoo.MobileNetV2()
        state = torch.load(folder / "mobilenet_v2.pt", map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model, torch.load(folder / "fashion.pt", weights_only=True)
    return zoo.load_mobilenetv2(), fashion_subset()


def fashion_subset():
    """The exact Fashion-MNIST examples the vision task can use (what export_data.py carries)."""
    from cntlora import zoo

    train_images, train_labels = zoo.fashion_mnist("train")
    test_images, test_labels = zoo.fashion_mnist("test")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    tr = torch.randperm(len(train_images), generator=g)[:1200]
    te = torch.randperm(len(test_images), generator=g)[:2000]
    return {"train_images": train_images[tr].clone(), "train_labels": train_labels[tr].clone(),
            "test_images": test_images[te].clone(), "test_labels": test_labels[te].clone()}


def vision_task(quick=False, train_size=None, image_size=64) -> Task:
    from cntlora import zoo

    n_train, n_val, n_test = _sizes(quick, train_size, 200, 2000)
    base, data = _mobilenet_and_fashion()
    tr_x, tr_y, te_x, te_y = data["train_images"], data["train_labels"], data["test_images"], data["test_labels"]
    base.eval()
    # every method sees the same architecture: 1×1 convs as Linear over channels (PEFT's SVD
    # inits reject Conv2d); the function and the parameter count are unchanged
    targets = convs_to_linear(base, pointwise_convs(base))
    base.classifier[1] = nn.Linear(1280, 10)

    build = _fresh_head_builder(base, lambda model: zoo._init_linear(model.classifier[1]))

    def collate(examples):
        images = torch.stack([x for x, _ in examples])
        labels = torch.stack([y for _, y in examples])
        return zoo.image_batches(images, labels, len(examples), size=image_size)[0]

    pairs = lambda xs, ys, idx: [(xs[i], ys[i]) for i in idx]
    batch_size, calibration_size = (8, QUICK_SIZE) if quick else (32, 64)
    photos = _reference_photos()
    photos = [] if photos is None else photos[:calibration_size]
    reference = [(zoo.image_tensor(chunk, image_size), torch.zeros(len(chunk), dtype=torch.long))
                 for chunk in (photos[i:i + batch_size] for i in range(0, len(photos), batch_size))]
    val_idx = list(range(n_val))
    train_idx = list(range(200, 200 + n_train))
    return Task(
        name=_name("vision", quick, train_size),
        build_model=build, target_modules=targets,
        train=pairs(tr_x, tr_y, train_idx), val=pairs(tr_x, tr_y, val_idx), test=pairs(te_x, te_y, range(n_test)),
        collate=collate, loss_fn=_image_loss, metric_fn=accuracy, metric="accuracy", higher_is_better=True,
        lora_kwargs={"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": ["classifier"]},
        batch_size=batch_size, calibration_size=calibration_size, reference_batches=reference,
    )


# -----------------------------------------------------------------------------
# lm: SmolLM2-135M + Shakespeare, held-out plays, perplexity

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _smollm2_and_plays():
    folder = _exported()
    if folder is not None and (folder / "smollm2").is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # exported in fp16 (export_data.py --only lm); trained in float32 like the packaged model
        tokenizer = AutoTokenizer.from_pretrained(folder / "smollm2")
        model = AutoModelForCausalLM.from_pretrained(folder / "smollm2", dtype=torch.float32)
        return model, tokenizer, json.loads((folder / "shakespeare.json").read_text())
    from cntlora import zoo

    model, tokenizer = zoo.load_smollm2()
    return model, tokenizer, zoo.shakespeare()


def lm_task(quick=False, train_size=None, seq_len=128) -> Task:
    from cntlora import zoo

    model, tokenizer, plays = _smollm2_and_plays()
    model.eval()
    names = sorted(plays)
    n_train, n_val, n_test = _sizes(quick, train_size, 32, 64)

    def windows(play_names, count):
        text = "\n".join(plays[n] for n in play_names)
        batches = zoo.lm_batches(tokenizer, text, count, seq_len, count)
        return [row for row in batches[0]["input_ids"]]

    # the last four plays (sorted by name) are held out: one for val, three for test
    train = windows(names[:-4], n_train)
    val = windows(names[-4:-3], n_val)
    test = windows(names[-3:], n_test)

    def collate(rows):
        x = torch.stack(rows)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    batch_size, calibration_size = (4, QUICK_SIZE) if quick else (8, 32)
    # modern expository English, where the fine-tuning data is Shakespeare's
    texts = _reference_texts()
    reference = zoo.lm_batches(tokenizer, "\n".join(texts), calibration_size, seq_len, batch_size) if texts else []

    return Task(
        name=_name("lm", quick, train_size),
        build_model=lambda seed: copy.deepcopy(model), target_modules=LM_TARGETS,
        train=train, val=val, test=test, collate=collate, loss_fn=_dict_loss, metric_fn=perplexity,
        metric="perplexity", higher_is_better=False,
        lora_kwargs={"r": 8, "lora_alpha": 8, "lora_dropout": 0.0},
        batch_size=batch_size, eval_batch_size=16, calibration_size=calibration_size, reference_batches=reference,
    )


# -----------------------------------------------------------------------------
# tiny: a random 2-layer BERT learning a token rule (no packages, seconds on a CPU)


def tiny_task(quick=False, train_size=None) -> Task:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        template = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    ids = torch.randint(1, 50, (96, 12), generator=g)
    labels = ids[:, 1] % 3  # learnable from one token
    examples = [(ids[i], labels[i]) for i in range(len(ids))]

    def collate(rows):
        x = torch.stack([r[0] for r in rows])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.stack([r[1] for r in rows])}

    build = _fresh_head_builder(template, lambda model: model.classifier.reset_parameters())
    # "pre-training" data for the reference set: the lower half of the vocabulary only
    reference_ids = torch.randint(1, 25, (16, 12), generator=g)
    reference = [collate([(row, torch.tensor(0)) for row in reference_ids[i:i + 8]]) for i in (0, 8)]

    n = train_size or 48
    return Task(
        name="tiny-quick" if quick else "tiny", build_model=build, target_modules=["query", "value", "intermediate.dense", "output.dense"],
        train=examples[32 : 32 + n], val=examples[:16], test=examples[16:32], collate=collate,
        loss_fn=_dict_loss, metric_fn=accuracy,
        lora_kwargs={"r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "modules_to_save": ["classifier"]},
        batch_size=8, eval_batch_size=16, calibration_size=16, reference_batches=reference,
    )


def _vit_task(**kwargs) -> Task:
    from ..vit.tasks import vit_task

    return vit_task(**kwargs)


TASKS = {
    "vision": lambda **kw: vision_task(**{"train_size": TRAIN_SIZE, **kw}),
    "vision-fewshot": lambda **kw: vision_task(**{"train_size": FEWSHOT_SIZE, **kw}),
    "text": lambda **kw: text_task(**{"train_size": TRAIN_SIZE, **kw}),
    "text-fewshot": lambda **kw: text_task(**{"train_size": FEWSHOT_SIZE, **kw}),
    "lm": lambda **kw: lm_task(**{"train_size": TRAIN_SIZE, **kw}),
    "lm-fewshot": lambda **kw: lm_task(**{"train_size": FEWSHOT_SIZE, **kw}),
    "tiny": tiny_task,
    "vit": _vit_task,
}


def make_task(name: str, **kwargs) -> Task:
    from cntlora.config import CNTLoRAError

    if name not in TASKS:
        raise CNTLoRAError(f"unknown task {name!r}; use one of {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
