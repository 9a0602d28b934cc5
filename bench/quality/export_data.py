"""Write the models and data of the benchmark's tasks into one folder that can travel.

The GPU machine has none of the packaged models or datasets; the tasks read this folder when
$CNTLORA_BENCH_DATA names it (see bench.quality.tasks). Sizes: MiniLM in fp16 (~45 MB),
MobileNetV2 in fp16 (~7 MB), the Fashion-MNIST subset the vision task uses (~3 MB), BBC News
cut to 2,000 characters per article (well past the 128 tokens the task reads), and the reference
sets of @pretrain_source=reference labels: 64 photo crops (zoo.reference_photos, 0.8 MB; needs
`pip install --no-deps scikit-image==0.26.0 scikit-learn==1.9.1` for the photo files) and 64
paragraphs of Python's documentation (zoo.reference_texts); with
--only lm: SmolLM2-135M in fp16 (~270 MB, in shards of at most 50 MiB except the 54 MiB
embedding, which one tensor fills) and the 42 Shakespeare plays as JSON (~5 MB).

    python -m bench.quality.export_data OUT_DIR [--only text vision lm]   (default: text vision)

text + vision fit one 64 MiB transfer as they are; split a folder with lm in it with
`python -m bench.quality.split_for_transfer`.
"""

import argparse
import sys
from pathlib import Path

import torch

from cntlora import zoo
from cntlora.files import write_json

from .tasks import fashion_subset


def export_text(out: Path):
    model, tokenizer = zoo.load_minilm(num_labels=5)
    model.half().save_pretrained(out / "minilm", safe_serialization=True)
    tokenizer.save_pretrained(out / "minilm")
    texts, labels, names = zoo.bbc_news()
    write_json(out / "bbc.json", {"texts": [t[:2000] for t in texts], "labels": labels, "class_names": names}, indent=None)
    # the reference set of @pretrain_source=reference labels (text and lm): this Python's own docs
    write_json(out / "reference_texts.json", zoo.reference_texts(), indent=None)


def export_vision(out: Path):
    state = zoo.load_mobilenetv2().state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / "mobilenet_v2.pt")
    torch.save(fashion_subset(), out / "fashion.pt")
    torch.save(zoo.reference_photos(), out / "reference_photos.pt")  # needs scikit-image and scikit-learn installed


def export_lm(out: Path):
    model, tokenizer = zoo.load_smollm2()
    # shards small enough to travel; save_pretrained never splits a tensor, so the tied
    # 49152 × 576 embedding (54 MiB in fp16) stays one file of its own
    model.half().save_pretrained(out / "smollm2", max_shard_size=50 * 2**20)
    tokenizer.save_pretrained(out / "smollm2")
    write_json(out / "shakespeare.json", zoo.shakespeare(), indent=None)


def main(argv=None) -> int:
    """Export the parts named by --only into the folder named on the command line.

    Returns:
        0.
    """
    p = argparse.ArgumentParser(prog="python -m bench.quality.export_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--only", nargs="+", choices=["text", "vision", "lm"], default=["text", "vision"])
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.only:
        {"text": export_text, "vision": export_vision, "lm": export_lm}[name](out)
    print(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, "MiB in", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
