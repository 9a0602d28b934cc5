"""The VTAB-style transfer suite for the small ViT: ten 28×28 grayscale tasks in VTAB's three groups.

The ViT (bench/vit/model.py) was pre-trained on the first 50,000 of Fashion-MNIST's 60,000 training
images. Every
task here moves away from that: new classes from new sources (natural), other imaging
domains (specialized), or labels about geometry and image formation that pre-training never
asked for (structured). Items drawn from Fashion-MNIST come from its 10k *test* images,
which pre-training never saw.

| group | task | classes | what it asks |
|---|---|---|---|
| natural | digits | 10 | scikit-learn's handwritten digits (8×8, upsampled) |
| natural | letters | 10 | letters A–J rendered in matplotlib's 12 DejaVu faces, rotated and moved |
| natural | photos | 10 | which of scikit-image's ten photographs a crop comes from |
| specialized | microscopy | 5 | histology, fundus, cell microscopy, deep-sky and lunar crops |
| specialized | sketch | 10 | Fashion-MNIST items as edge maps (Sobel), the item's class |
| structured | rotation | 4 | the item's rotation, a multiple of 90° |
| structured | count | 4 | how many small items (1–4) |
| structured | position | 9 | which cell of a 3×3 grid the item is in |
| structured | size | 4 | the item's size, placed anywhere |
| structured | corruption | 5 | clean, noise, blur, inverted or occluded |

Each task has 800 training, 200 validation and (about) 1,000 test images; the few-shot regime
trains on the first 100 training images. `build_suite` makes every array from a fixed seed,
so the same packages give the same suite; photos and microscopy take their training crops
and their test crops from disjoint rows of each source image.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
from pathlib import Path

import numpy as np

SIZE = 28
GROUPS = {
    "natural": ("digits", "letters", "photos"),
    "specialized": ("microscopy", "sketch"),
    "structured": ("rotation", "count", "position", "size", "corruption"),
}
TASK_NAMES = tuple(t for names in GROUPS.values() for t in names)
N_TRAIN, N_VAL, N_TEST, N_FEWSHOT = 800, 200, 1000, 100
REFERENCE_SIZE = 4096  # the largest pre-training sample drawn (Fashion-MNIST training images)
PRETRAIN_IMAGES = 50_000  # pre-training uses the first 50,000 training images; the last 10,000 are never used
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "rocket")
MICROSCOPY = ("immunohistochemistry", "retina", "cell", "hubble_deep_field", "moon")
LETTERS = "ABCDEFGHIJ"


def group_of(task: str) -> str:
    """The VTAB group of a suite task ('natural', 'specialized' or 'structured')."""
    return next(g for g, names in GROUPS.items() if task in names)


def read_idx(path: Path, offset: int) -> np.ndarray:
    """An IDX file's payload as uint8 (offset 16 for images, 8 for labels), from path.gz or path.xz."""
    for suffix, opener in ((".gz", gzip.open), (".xz", lzma.open)):
        if path.with_name(path.name + suffix).is_file():
            with opener(path.with_name(path.name + suffix)) as f:
                return np.frombuffer(f.read(), np.uint8, offset=offset)
    raise FileNotFoundError(f"{path}.gz not found; Fashion-MNIST's files come from Debian's dataset-fashion-mnist")


def fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's `split` ('train' or 't10k') as (N×28×28 uint8, N labels)."""
    images = read_idx(Path(folder) / f"{split}-images-idx3-ubyte", 16).reshape(-1, SIZE, SIZE)
    labels = read_idx(Path(folder) / f"{split}-labels-idx1-ubyte", 8)
    return images, labels


# -----------------------------------------------------------------------------
# image helpers (PIL for resampling and rotation; it comes with matplotlib)


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))


def _gray(img: np.ndarray) -> np.ndarray:
    img = img[..., :3] if img.ndim == 3 else img
    if img.ndim == 3:
        img = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    img = img.astype(np.float64)
    return np.clip(255 * (img - img.min()) / max(img.max() - img.min(), 1e-9), 0, 255).astype(np.uint8)


def _crops(img: np.ndarray, n: int, rng, rows: tuple[float, float]) -> np.ndarray:
    """n square crops of random side (28 to 96 px) from a band of rows, resized to 28×28."""
    h, w = img.shape
    top, bottom = int(rows[0] * h), int(rows[1] * h)
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        side = int(rng.integers(SIZE, min(96, bottom - top, w) + 1))
        y = int(rng.integers(top, bottom - side + 1))
        x = int(rng.integers(0, w - side + 1))
        out[i] = _resize(np.ascontiguousarray(img[y:y + side, x:x + side]), SIZE)
    return out


def _source_task(names, loader, rng, n_fit: int, n_test: int):
    """Crop-source classification: fit crops from the top 65% of each image's rows, test from the rest."""
    per_fit, per_test = -(-n_fit // len(names)), -(-n_test // len(names))
    fit_x, fit_y, test_x, test_y = [], [], [], []
    for label, name in enumerate(names):
        img = _gray(loader(name))
        fit_x.append(_crops(img, per_fit, rng, (0.0, 0.65)))
        test_x.append(_crops(img, per_test, rng, (0.65, 1.0)))
        fit_y += [label] * per_fit
        test_y += [label] * per_test
    return np.concatenate(fit_x), np.array(fit_y), np.concatenate(test_x), np.array(test_y)


def _place(canvas: np.ndarray, item: np.ndarray, y: int, x: int) -> None:
    h, w = item.shape
    canvas[y:y + h, x:x + w] = np.maximum(canvas[y:y + h, x:x + w], item)


# -----------------------------------------------------------------------------
# the tasks: each returns (images, labels) of n examples from rng (and Fashion-MNIST's test items)


def _digits(rng, n):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = rng.permutation(len(d.target))[:n]
    out = np.zeros((len(order), SIZE, SIZE), np.uint8)
    for i, k in enumerate(order):
        out[i, 4:24, 4:24] = _resize((d.images[k] * 255 / 16).astype(np.uint8), 20)
    return out, d.target[order]


def _letters(rng, n):
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = [f for f in sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
             if "Display" not in f.name]  # the Display faces hold a handful of glyphs, no letters
    labels = rng.integers(0, len(LETTERS), n)
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i, label in enumerate(labels):
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(40, 64)))
        img = Image.new("L", (96, 96))
        ImageDraw.Draw(img).text((48, 48), LETTERS[label], fill=255, font=font, anchor="mm")
        img = img.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR,
                         translate=(float(rng.uniform(-12, 12)), float(rng.uniform(-12, 12))))
        out[i] = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR))
    return out, labels


def _items(fm, rng, n):
    idx = rng.integers(0, len(fm[0]), n)
    return fm[0][idx], fm[1][idx]


def _sketch(fm, rng, n):
    items, labels = _items(fm, rng, n)
    x = items.astype(np.float64)
    gy = np.zeros_like(x)
    gx = np.zeros_like(x)
    gy[:, 1:-1, 1:-1] = (x[:, 2:, :-2] + 2 * x[:, 2:, 1:-1] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, :-2, 1:-1] + x[:, :-2, 2:])
    gx[:, 1:-1, 1:-1] = (x[:, :-2, 2:] + 2 * x[:, 1:-1, 2:] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, 1:-1, :-2] + x[:, 2:, :-2])
    mag = np.hypot(gx, gy)
    mag = 255 * mag / np.maximum(mag.max(axis=(1, 2), keepdims=True), 1e-9)
    return mag.astype(np.uint8), labels


def _rotation(fm, rng, n):
    items, _ = _items(fm, rng, n)
    labels = rng.integers(0, 4, n)
    return np.stack([np.rot90(x, k) for x, k in zip(items, labels)]), labels


def _count(fm, rng, n):
    labels = rng.integers(0, 4, n)
    out = np.zeros((n, SIZE, SIZE), np.uint8)
    for i, label in enumerate(labels):
        items, _ = _items(fm, rng, label + 1)
        for item, cell in zip(items, rng.permutation(9)[:label + 1]):
            _place(out[i], _resize(item, 9), 9 * (cell // 3) + int(rng.integers(0, 2)), 9 * (cell % 3) + int(rng.integers(0, 2)))
    return out, labels


def _position(fm, rng, n):
    items, _ = _items(fm, rng, n)
    labels = rng.integers(0, 9, n)
    out = np.zeros((n, SIZE, SIZE), np.uint8)
    for i, (item, label) in enumerate(zip(items, labels)):
        y = int(np.clip(7 * (label // 3) + rng.integers(-1, 2), 0, 14))
        x = int(np.clip(7 * (label % 3) + rng.integers(-1, 2), 0, 14))
        _place(out[i], _resize(item, 14), y, x)
    return out, labels


def _size(fm, rng, n):
    sides = (9, 14, 20, 27)
    items, _ = _items(fm, rng, n)
    labels = rng.integers(0, len(sides), n)
    out = np.zeros((n, SIZE, SIZE), np.uint8)
    for i, (item, label) in enumerate(zip(items, labels)):
        side = sides[label]
        _place(out[i], _resize(item, side), int(rng.integers(0, SIZE - side + 1)), int(rng.integers(0, SIZE - side + 1)))
    return out, labels


def _corruption(fm, rng, n):
    items, _ = _items(fm, rng, n)
    labels = rng.integers(0, 5, n)
    out = items.astype(np.float64).copy()
    for i, label in enumerate(labels):
        x = out[i]
        if label == 1:  # Gaussian noise
            x += rng.normal(0, 40, x.shape)
        elif label == 2:  # blur: a 3×3 box, twice
            for _ in range(2):
                p = np.pad(x, 1, mode="edge")
                x = sum(p[dy:dy + SIZE, dx:dx + SIZE] for dy in range(3) for dx in range(3)) / 9
        elif label == 3:  # inverted
            x = 255 - x
        elif label == 4:  # occluded by a grey square
            y0, x0 = rng.integers(4, 14, 2)
            x[y0:y0 + 10, x0:x0 + 10] = 128
        out[i] = x
    return np.clip(out, 0, 255).astype(np.uint8), labels


_FROM_ITEMS = {"sketch": _sketch, "rotation": _rotation, "count": _count, "position": _position, "size": _size,
               "corruption": _corruption}


def _skimage(name):
    import skimage.data

    return getattr(skimage.data, name)()


def make_task_arrays(task: str, fm_test, seed: int) -> dict:
    """One task's splits as uint8 arrays: {"train_x", "train_y", "val_x", "val_y", "test_x", "test_y"}.

    Args:
        task: a name in TASK_NAMES.
        fm_test: Fashion-MNIST's test split (images, labels), the source of the structured items.
        seed: the task's seed.

    Returns:
        The arrays; train 800, val 200, test about 1,000 (digits: the 797 images left).

    Raises:
        ValueError: an unknown task.
    """
    rng = np.random.default_rng(seed)
    fit = N_TRAIN + N_VAL
    if task in ("photos", "microscopy"):
        fx, fy, tx, ty = _source_task(PHOTOS if task == "photos" else MICROSCOPY, _skimage, rng, fit, N_TEST)
        order = rng.permutation(len(fy))[:fit]
        fx, fy = fx[order], fy[order]
    elif task == "digits":
        x, y = _digits(rng, 10_000)
        fx, fy, tx, ty = x[:fit], y[:fit], x[fit:], y[fit:]
    elif task == "letters" or task in _FROM_ITEMS:
        x, y = _letters(rng, fit + N_TEST) if task == "letters" else _FROM_ITEMS[task](fm_test, rng, fit + N_TEST)
        fx, fy, tx, ty = x[:fit], y[:fit], x[fit:], y[fit:]
    else:
        raise ValueError(f"unknown suite task {task!r}; use one of {', '.join(TASK_NAMES)}")
    return {"train_x": fx[:N_TRAIN], "train_y": fy[:N_TRAIN], "val_x": fx[N_TRAIN:], "val_y": fy[N_TRAIN:],
            "test_x": tx, "test_y": ty.astype(np.int64)}


def build_suite(fashion_folder: Path, out: Path, tasks=TASK_NAMES) -> Path:
    """Write every task's arrays and the pre-training sample to one .npz file.

    Args:
        fashion_folder: Fashion-MNIST's IDX gzip files.
        out: the .npz path (written whole, then renamed into place).
        tasks: the tasks to include.

    Returns:
        out.
    """
    fm_test = fashion_mnist(fashion_folder, "t10k")
    train_x = fashion_mnist(fashion_folder, "train")[0][:PRETRAIN_IMAGES]
    arrays = {"reference_x": train_x[reference_indices(len(train_x))]}
    for task in tasks:
        for key, value in make_task_arrays(task, fm_test, seed=100 + TASK_NAMES.index(task)).items():
            arrays[f"{task}/{key}"] = value
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    return out


def reference_indices(n_train: int | None = None) -> np.ndarray:
    """The indices, among the first `n_train` (default PRETRAIN_IMAGES) training images, of the pre-training sample."""
    return np.random.default_rng(0).permutation(n_train or PRETRAIN_IMAGES)[:REFERENCE_SIZE]


def pack(fashion_folder: Path, dest: Path) -> Path:
    """Write the Fashion-MNIST files `build_suite` reads, small enough to travel (about 5.4 MB).

    The suite reads every test image but only the 4,096 training images of the pre-training
    sample; every other training image is written as zeros, which xz stores in almost nothing.
    `build_suite(dest, ...)` then gives the same arrays as `build_suite(fashion_folder, ...)`.

    Args:
        fashion_folder: Fashion-MNIST's IDX files (.gz or .xz).
        dest: the folder to write (created; the four IDX files as .xz).

    Returns:
        dest.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    images, labels = fashion_mnist(fashion_folder, "train")
    keep = np.zeros_like(images[:PRETRAIN_IMAGES])
    idx = reference_indices()
    keep[idx] = images[idx]
    test_x, test_y = fashion_mnist(fashion_folder, "t10k")
    for name, array, magic in (("train-images-idx3-ubyte", keep, 2051), ("train-labels-idx1-ubyte", labels, 2049),
                               ("t10k-images-idx3-ubyte", test_x, 2051), ("t10k-labels-idx1-ubyte", test_y, 2049)):
        header = np.array([magic, *array.shape], dtype=">u4").tobytes()
        tmp = dest / f"{name}.xz.tmp"
        tmp.write_bytes(lzma.compress(header + np.ascontiguousarray(array).tobytes(), preset=9))
        tmp.replace(dest / f"{name}.xz")
    return dest


def digest(path: Path) -> dict:
    """The sha256 of each array's bytes in a suite file (a .npz's own hash changes with its zip timestamps)."""
    with np.load(path) as z:
        return {k: hashlib.sha256(np.ascontiguousarray(z[k]).tobytes()).hexdigest() for k in sorted(z.files)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the ViT transfer suite's arrays (needs scikit-learn, "
                                                 "scikit-image and Fashion-MNIST's files).")
    parser.add_argument("fashion_folder", type=Path)
    parser.add_argument("out", type=Path, help="the suite's .npz; with --pack, the folder to write")
    parser.add_argument("--pack", action="store_true", help="write the small copy of the files the build reads")
    parser.add_argument("--digest", type=Path, help="write each array's sha256 to this file after the build")
    args = parser.parse_args()
    if args.pack:
        print(pack(args.fashion_folder, args.out))
    else:
        print(build_suite(args.fashion_folder, args.out))
        if args.digest:
            args.digest.write_text("".join(f"{v}  {k}\n" for k, v in digest(args.out).items()))
