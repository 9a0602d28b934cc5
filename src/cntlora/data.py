"""Models and calibration data from names: a packaged model or an HF folder, a text file, an
image folder or a packaged data set, drawn down to a seeded calibration subset and batched.

The command line and the demo load through here. Packaged names (`minilm`, `smollm2`,
`mobilenetv2`, `bbc-news`, `shakespeare`, `fashion-mnist`) come from cntlora.zoo, imported
only when such a name is asked for.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

from . import vision
from .config import CNTLoRAError

PACKAGED_MODELS = ("minilm", "smollm2", "mobilenetv2")
PACKAGED_DATA = ("bbc-news", "shakespeare", "fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_SIZE = 64
CALIBRATION_SIZE = 128  # examples drawn for the statistics unless told otherwise
BATCH_SIZE = 16
MAX_LENGTH = 128  # tokens per text example
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# where a model family's attention and MLP projections are, by transformers model_type
_BERT = ["query", "key", "value", "dense"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILY_TARGETS = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


# -----------------------------------------------------------------------------
# models


def load_model(name: str, seed: int = 0):
    """A packaged model or an HF model folder, in float32 and eval mode.

    Args:
        name: `minilm`, `smollm2`, `mobilenetv2`, or a folder written by save_pretrained.
        seed: seeds the layers the checkpoint lacks (a new head), so the same base can be rebuilt.

    Returns:
        (model, tokenizer); the tokenizer is None for an image model or a folder without one.

    Raises:
        CNTLoRAError: the name is neither a packaged model nor a model folder.
    """
    import torch

    if name in PACKAGED_MODELS:
        from . import zoo

        loaded = zoo.MODELS[name]()
        return loaded if isinstance(loaded, tuple) else (loaded, None)
    folder = Path(name)
    if not folder.is_dir():
        raise CNTLoRAError(f"model {name!r} is neither a folder nor a packaged model; use an HF model folder "
                           f"(saved with save_pretrained) or one of {', '.join(PACKAGED_MODELS)}")
    if not (folder / "config.json").is_file():
        raise CNTLoRAError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise CNTLoRAError(f"{folder} has config.json but no weights (model.safetensors); write the model "
                           "there with save_pretrained")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [None])[0]
    model_class = (getattr(transformers, arch, None) if arch else None) or transformers.AutoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_pretrained(folder, dtype=torch.float32)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def default_target_modules(model) -> List[str]:
    """The attention and MLP projections of a known family, or the 1×1 convolutions of a CNN.

    Args:
        model: a transformers model (by its config's model_type), a timm-style vision
            transformer (cntlora.vision), or a plain torch CNN.

    Returns:
        Layer names or name suffixes for `target_modules`.

    Raises:
        CNTLoRAError: an unknown model family; the message says how to name targets.
    """
    from torch import nn

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILY_TARGETS:
        return list(FAMILY_TARGETS[model_type])
    found = vision.default_targets(model)
    if found:
        return found
    pointwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    if pointwise and model_type is None:
        return pointwise
    linear = [n if n.rsplit(".", 1)[-1].isdigit() else n.rsplit(".", 1)[-1]
              for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    raise CNTLoRAError(f"no default target modules for model type {model_type or type(model).__name__!r}; "
                       "name them with --target-modules (e.g. --target-modules "
                       f"{' '.join(dict.fromkeys(linear[:12])) or 'q_proj v_proj'})")


# -----------------------------------------------------------------------------
# reading and batching


def read_texts(path: Path) -> List[str]:
    """A .jsonl file's `text` fields, or any other text file's non-empty lines.

    Args:
        path: the file.

    Returns:
        The examples, in file order.

    Raises:
        CNTLoRAError: a bad JSON line, a line without a string `text`, non-UTF-8 bytes, or no text.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CNTLoRAError(f"{path} line {number} is not JSON ({e.msg}); write one JSON object per line")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CNTLoRAError(f"{path} line {number} has no string field 'text'; "
                                       'write lines like {"text": "..."}')
                texts.append(record["text"])
    else:
        try:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise CNTLoRAError(f"{path} is not UTF-8 text; pass a .txt or .jsonl file, or a folder of images")
    if not texts:
        raise CNTLoRAError(f"{path} holds no text; write one example per line (.txt) or per JSON line (.jsonl)")
    return texts


def image_files(folder: Path) -> List[Path]:
    """The image files of a folder, sorted by name.

    Args:
        folder: the folder; files are images by their suffix (IMAGE_SUFFIXES).

    Returns:
        The paths.

    Raises:
        CNTLoRAError: the folder holds no image.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CNTLoRAError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                           "pass a folder of images or a text file")
    return files


def read_images(files: Sequence[Path], size: int = IMAGE_SIZE):
    """Images as one float tensor N×3×size×size, ImageNet-normalized (as the packaged CNN expects).

    Args:
        files: image files (PIL reads them; without PIL, matplotlib reads PNG and JPEG).
        size: the side every image is resized to.

    Returns:
        The N×3×size×size float32 tensor.

    Raises:
        CNTLoRAError: a file cannot be read as an image.
    """
    import torch
    import torch.nn.functional as F

    images = [F.interpolate(vision.read_pixels(p).unsqueeze(0), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True) for p in files]
    return imagenet_normalize(torch.cat(images))


def imagenet_normalize(x):
    """Shift and scale pixels by ImageNet's channel means and deviations.

    Args:
        x: float N×3×H×W pixels in [0, 1].

    Returns:
        The normalized tensor, of x's shape and dtype.
    """
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def text_batches(tokenizer, texts: Sequence[str], batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH,
                 labels: Optional[Sequence[int]] = None, padding: Union[bool, str] = True) -> List[dict]:
    """Tokenized batches of `input_ids` and `attention_mask` (and `labels` when given).

    Args:
        tokenizer: a transformers tokenizer; one without a pad token pads with its EOS token
            (padded positions are masked out anyway).
        texts: the examples.
        batch_size: examples per batch.
        max_length: longer examples are truncated to this many tokens.
        labels: one int class per text, or None.
        padding: True pads each batch to its longest example; "max_length" pads to max_length.

    Returns:
        A list of dicts of tensors.
    """
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=padding, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels[i:i + batch_size], dtype=torch.long)
        batches.append(batch)
    return batches


# -----------------------------------------------------------------------------
# calibration


def calibration_subset(items: Iterable, n: Optional[int], seed: int = 0) -> list:
    """A reproducible draw of n examples, in their original order.

    The draw is nested: for one seed, the n examples are among the first m > n drawn.

    Args:
        items: a sequence (drawn from at random) or an iterator without a length (its first n
            examples are taken, so an endless stream stops at n).
        n: how many examples; None takes them all.
        seed: seeds the draw.

    Returns:
        A list of at most n items.

    Raises:
        CNTLoRAError: n is not positive, or n is None for an iterator without a length (it might
            never end).
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise CNTLoRAError(f"the calibration size must be a positive number of examples (or all), got {n!r}")
    if not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        if n is None:
            raise CNTLoRAError("calibration size 'all' needs data with a length; a stream might never end, "
                               "so give a calibration size (a number of examples)")
        return list(itertools.islice(items, n))
    if n is None or n >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


@dataclass
class Calibration:
    """The calibration batches drawn from a data set, and how many examples it offered."""

    batches: list
    available: int

    def summary(self) -> str:
        """One line: examples used of those available, and the tokens (text) or pixels (images)."""
        return calibration_summary(self.batches, self.available)


def calibration_summary(batches: Sequence, available: Optional[int] = None) -> str:
    """How much data calibration batches hold, in words.

    Args:
        batches: dicts with input_ids (and attention_mask), or image tensors N×C×H×W (alone or
            first in a tuple).
        available: the examples the data set offered, or None.

    Returns:
        e.g. "128 of 2225 examples, 15,209 tokens (attention-mask sum)" or
        "128 of 60000 images, 524,288 pixels (64×64 each)".
    """
    of = f" of {available}" if available is not None else ""
    first = batches[0] if batches else None
    if isinstance(first, dict):
        examples = sum(len(b["input_ids"]) for b in batches)
        masks = [b.get("attention_mask") for b in batches]
        if all(m is not None for m in masks):
            return f"{examples}{of} examples, {sum(int(m.sum()) for m in masks):,} tokens (attention-mask sum)"
        return f"{examples}{of} examples, {sum(b['input_ids'].numel() for b in batches):,} tokens"
    images = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    count = sum(len(x) for x in images)
    if not images:
        return f"0{of} examples"
    h, w = images[0].shape[-2:]
    return f"{count}{of} images, {count * h * w:,} pixels ({h}×{w} each)"


def load_batches(name: str, tokenizer, calibration_size: Optional[int] = CALIBRATION_SIZE,
                 batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH, seed: int = 0,
                 image: Optional["vision.ImagePreprocessing"] = None) -> Calibration:
    """Calibration batches from a packaged data set, a text file or an image folder.

    Args:
        name: `bbc-news`, `shakespeare` (passages of 4·max_length characters), `fashion-mnist`
            (the training images), a .txt/.jsonl file, or a folder of images.
        tokenizer: the model's tokenizer, or None for an image model.
        calibration_size: examples drawn (calibration_subset); None uses every example.
        batch_size: examples per batch.
        max_length: tokens per text example.
        seed: seeds the draw.
        image: how the model reads images (vision.preprocessing_for); None: 3×64×64, ImageNet-normalized.

    Returns:
        A Calibration: the batches (dicts for text, N×C×H×W tensors for images) and the
        number of examples the data offered.

    Raises:
        CNTLoRAError: the data are missing, empty, or of the other kind than the model (text vs images).
    """
    path = Path(name)
    if name == "fashion-mnist" or (name not in PACKAGED_DATA and path.is_dir()):
        if tokenizer is not None:
            raise CNTLoRAError("the data are images but the model takes text; pass a text file, or an image model "
                               "such as mobilenetv2")
        if name == "fashion-mnist":
            from . import zoo

            images, _ = zoo.fashion_mnist("train")
            pick = calibration_subset(range(len(images)), calibration_size, seed)
            convert = (lambda x: image.from_pixels(x.float().div(255).unsqueeze(1))) if image else \
                (lambda x: zoo.image_tensor(x, IMAGE_SIZE))
            return Calibration([convert(x) for x in images[pick].split(batch_size)], len(images))
        files = image_files(path)
        picked = calibration_subset(files, calibration_size, seed)
        images = image.read(picked) if image else read_images(picked)
        return Calibration(list(images.split(batch_size)), len(files))
    if name in PACKAGED_DATA:
        if tokenizer is None:
            raise CNTLoRAError(f"{name!r} is text but the model takes images; use fashion-mnist or an image folder")
        texts = _packaged_texts(name, max_length)
    elif not path.exists():
        raise CNTLoRAError(f"data {name!r} not found; pass a .txt/.jsonl file, a folder of images, "
                           f"or one of {', '.join(PACKAGED_DATA)}")
    elif tokenizer is None:
        raise CNTLoRAError(f"{path} is text but the model takes images; pass a folder of images")
    else:
        texts = read_texts(path)
    picked = calibration_subset(texts, calibration_size, seed)
    return Calibration(text_batches(tokenizer, picked, batch_size, max_length), len(texts))


def _packaged_texts(name: str, max_length: int) -> List[str]:
    """BBC News's articles, or Shakespeare's plays cut into passages of about max_length tokens."""
    from . import zoo

    if name == "bbc-news":
        return zoo.bbc_news()[0]
    plays = zoo.shakespeare()
    step = 4 * max_length  # characters: about max_length tokens of English
    return [plays[key][i:i + step] for key in sorted(plays) for i in range(0, len(plays[key]), step)]
