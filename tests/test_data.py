"""cntlora.data: calibration draws, their summaries, batching and loading errors; a light `import cntlora`."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from cntlora import CNTLoRAError, data


def test_calibration_subset_is_seeded_nested_and_in_order():
    items = [f"x{i}" for i in range(100)]
    small = data.calibration_subset(items, 16, seed=3)
    assert len(small) == 16 == len(set(small))
    assert small == sorted(small, key=items.index)  # the data's own order
    assert small == data.calibration_subset(items, 16, seed=3)
    assert small != data.calibration_subset(items, 16, seed=4)
    assert set(small) <= set(data.calibration_subset(items, 64, seed=3))  # nested for one seed
    assert data.calibration_subset(items, None) == items
    assert data.calibration_subset(items, 1000) == items
    assert data.calibration_subset(range(10), 3, seed=0) == data.calibration_subset(list(range(10)), 3, seed=0)


def test_calibration_subset_of_an_endless_stream_stops_at_the_cap_or_refuses():
    assert data.calibration_subset(itertools.count(), 5) == [0, 1, 2, 3, 4]
    with pytest.raises(CNTLoRAError, match="stream might never end"):
        data.calibration_subset(itertools.count(), None)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(CNTLoRAError, match="positive number of examples"):
            data.calibration_subset([1, 2, 3], bad)


def test_calibration_summary_counts_tokens_or_pixels():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    text = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}] * 3
    assert data.calibration_summary(text, 50) == "6 of 50 examples, 15 tokens (attention-mask sum)"
    assert data.calibration_summary([{"input_ids": torch.zeros(2, 8)}]) == "2 examples, 16 tokens"
    images = [torch.zeros(4, 3, 8, 8), torch.zeros(1, 3, 8, 8)]
    assert data.calibration_summary(images, 9) == "5 of 9 images, 320 pixels (8×8 each)"
    assert data.calibration_summary([(x, None) for x in images]) == "5 images, 320 pixels (8×8 each)"


class WordTokenizer:
    """A stand-in tokenizer: one id per word, padded like transformers' (no pad token at first)."""

    pad_token, eos_token = None, "</s>"

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[len(w) for w in t.split()][:max_length] for t in texts]
        width = max_length if padding == "max_length" else max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def test_text_batches_pad_truncate_and_label():
    tok = WordTokenizer()
    batches = data.text_batches(tok, ["a bb", "a bb ccc dddd eeeee", "x"], batch_size=2, max_length=4, labels=[0, 1, 2])
    assert tok.pad_token == "</s>"  # a tokenizer without a pad token pads with EOS
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 1)]
    assert batches[0]["attention_mask"].sum(1).tolist() == [2, 4]
    assert [b["labels"].tolist() for b in batches] == [[0, 1], [2]]
    fixed = data.text_batches(tok, ["a", "b c"], batch_size=8, max_length=6, padding="max_length")
    assert len(fixed) == 1 and fixed[0]["input_ids"].shape == (2, 6) and "labels" not in fixed[0]


def test_load_batches_draws_from_a_text_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"w{i} " * (i % 5 + 1)}) + "\n" for i in range(40)))
    drawn = data.load_batches(str(tmp_path / "d.jsonl"), WordTokenizer(), calibration_size=10, batch_size=4, seed=1)
    assert drawn.available == 40 and [len(b["input_ids"]) for b in drawn.batches] == [4, 4, 2]
    assert drawn.summary().startswith("10 of 40 examples, ")
    again = data.load_batches(str(tmp_path / "d.jsonl"), WordTokenizer(), calibration_size=10, batch_size=4, seed=1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(drawn.batches, again.batches))
    every = data.load_batches(str(tmp_path / "d.jsonl"), WordTokenizer(), calibration_size=None, batch_size=16)
    assert every.summary().startswith("40 of 40 examples")


def test_load_batches_reads_an_image_folder(tmp_path):
    import matplotlib.image

    for i in range(5):
        matplotlib.image.imsave(tmp_path / f"{i}.png", torch.rand(10, 12, 3, generator=torch.Generator().manual_seed(i)).numpy())
    drawn = data.load_batches(str(tmp_path), None, calibration_size=3, batch_size=2)
    assert [x.shape for x in drawn.batches] == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert drawn.summary() == "3 of 5 images, 12,288 pixels (64×64 each)"
    with pytest.raises(CNTLoRAError, match="the model takes text"):
        data.load_batches(str(tmp_path), WordTokenizer())


@pytest.mark.parametrize("name, tokenizer, message", [
    ("no-such-file.txt", "text", "not found"),
    ("bbc-news", None, "is text but the model takes images"),
    ("fashion-mnist", "text", "the model takes text"),
])
def test_load_batches_errors_name_the_fix(name, tokenizer, message):
    with pytest.raises(CNTLoRAError, match=message):
        data.load_batches(name, WordTokenizer() if tokenizer else None)


def test_import_cntlora_is_light():
    """No matplotlib, zoo or benchmark, no environment change and no subprocess on `import cntlora`
    (nor on `import cntlora.cli`); cntlora.zoo still comes on first use."""
    code = """if True:
        import os, subprocess, sys
        started = []
        subprocess.Popen.__init__ = lambda self, *a, **k: started.append(a)
        before = dict(os.environ)
        import cntlora
        heavy = sorted(m for m in sys.modules if m.startswith(('matplotlib', 'cntlora.zoo', 'cntlora.bench', 'bench')))
        import cntlora.cli, cntlora.data, cntlora.demo
        heavy_cli = sorted(m for m in sys.modules if m.startswith(('matplotlib', 'cntlora.zoo', 'bench')))
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print(heavy, heavy_cli, changed, started, callable(cntlora.zoo.load_minilm))
    """
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split("\n")[0] == "[] [] [] [] True", out.stdout + out.stderr
