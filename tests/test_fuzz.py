"""Fuzz: damaged statistics files and adapter folders load as what they were, or give one CNTLoRAError.

The CI runs a few thousand cases; `-m slow` runs over 100k statistics files and 10k folders,
and kills saves at random moments. Each test prints its counts.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import cntlora
from cntlora import CNTLoRAConfig, CNTLoRAError

from helpers import TwoLayerMLP, feature_batches

TESTS = Path(__file__).parent


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random damage: flipped bytes, a cut, an insertion, a block of zeros, or an edit of the JSON header."""
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randrange(len(b))]
    elif kind == 2:
        at = rng.randrange(len(b) + 1)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:
        at = rng.randrange(len(b))
        b[at:at + rng.randint(1, 64)] = bytes(min(64, len(b) - at))
    elif kind == 4 and len(b) > 8:  # a digit, quote or brace of the header changed
        header = int.from_bytes(b[:8], "little")
        spots = [i for i in range(8, min(8 + header, len(b))) if chr(b[i]) in '0123456789"{}[],:.e-']
        if spots:
            i = rng.choice(spots)
            b[i] = ord(rng.choice('0123456789"{}[],:.e- '))
    else:  # the 8-byte header length
        b[:8] = rng.randrange(2**64).to_bytes(8, "little")
    return bytes(b)


def same_statistics(a, b) -> bool:
    if set(a.fine) != set(b.fine) or a.groups != b.groups or (a.reference is None) != (b.reference is None):
        return False
    sets = [(a.fine, b.fine)] + ([(a.reference, b.reference)] if a.reference is not None else [])
    return all(torch.equal(x[g].count, y[g].count) and torch.equal(x[g].total, y[g].total)
               and torch.equal(x[g].outer, y[g].outer) for x, y in sets for g in x)


def fuzz_statistics(tmp_path, cases: int, seed: int = 0) -> dict:
    stats = cntlora.collect_statistics(TwoLayerMLP(n=6, h=5, m=3), feature_batches(n=6), ["fc1", "fc2"],
                                       reference_dataloader=feature_batches(n=6, seed=4), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    original, data = cntlora.Statistics.load(path), path.read_bytes()
    rng, counts = random.Random(seed), {"refused": 0, "loaded unchanged": 0}
    damaged = tmp_path / "damaged.safetensors"
    for _ in range(cases):
        damaged.write_bytes(mutate(data, rng))
        try:
            loaded = cntlora.Statistics.load(damaged)
        except CNTLoRAError:
            counts["refused"] += 1
            continue
        assert same_statistics(loaded, original), "a damaged file loaded as other statistics"
        counts["loaded unchanged"] += 1
    return counts


def test_fuzz_statistics_load(tmp_path):
    counts = fuzz_statistics(tmp_path, 3000)
    print(f"Statistics.load on 3000 damaged files: {counts}")
    assert counts["refused"] > 2500


@pytest.mark.slow
def test_fuzz_statistics_load_100k(tmp_path):
    counts = fuzz_statistics(tmp_path, 100_000, seed=1)
    print(f"Statistics.load on 100000 damaged files: {counts}")


def _adapter(base):
    torch.manual_seed(0)
    cfg = CNTLoRAConfig(r=2, base=base)
    return cntlora.initialize(TwoLayerMLP(), feature_batches(), cfg, target_modules=["fc1", "fc2"], progress=False)


def fuzz_adapters(tmp_path, cases: int, seed: int = 0) -> dict:
    x = feature_batches()[0]
    rng, counts = random.Random(seed), {"refused": 0, "loaded unchanged": 0}
    good = {}
    for base in ("residual", "subspace"):
        model = _adapter(base)
        cntlora.save_adapter(model, tmp_path / base)
        with torch.no_grad():
            good[base] = model(x)
    for i in range(cases):
        base = rng.choice(sorted(good))
        folder = tmp_path / f"case-{i % 2}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp_path / base, folder)
        victim = folder / rng.choice(sorted(os.listdir(folder)))
        victim.write_bytes(mutate(victim.read_bytes(), rng))
        torch.manual_seed(0)
        fresh = TwoLayerMLP()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = cntlora.load_adapter(fresh, folder)
        except CNTLoRAError:
            counts["refused"] += 1
            continue
        with torch.no_grad():
            out = loaded(x)
        # a README.md or whitespace change may leave a valid folder: then it must be the same adapter
        if not torch.allclose(out, good[base], atol=1e-6):
            warned = any("changed since cntlora saved it" in str(w.message) for w in caught)
            counts.setdefault("loaded other weights, with a warning" if warned else "silently wrong", []).append(
                victim.name)
            continue
        counts["loaded unchanged"] += 1
    return counts


def test_fuzz_adapter_load(tmp_path):
    counts = fuzz_adapters(tmp_path, 300)
    print(f"load_adapter on 300 damaged folders: {counts}")
    # PEFT may rewrite adapter_model.safetensors (further training), so a changed file loads, with a warning
    assert "silently wrong" not in counts
    assert all(name == "adapter_model.safetensors" for name in counts.get("loaded other weights, with a warning", []))


@pytest.mark.slow
def test_fuzz_adapter_load_10k(tmp_path):
    counts = fuzz_adapters(tmp_path, 10_000, seed=1)
    print(f"load_adapter on 10000 damaged folders: {counts}")
    assert "silently wrong" not in counts
    assert all(name == "adapter_model.safetensors" for name in counts.get("loaded other weights, with a warning", []))


SAVER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import cntlora
    from helpers import TwoLayerMLP, feature_batches
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(cntlora.initialize(TwoLayerMLP(), feature_batches(), cntlora.CNTLoRAConfig(r=2, base="residual",
                      seed=seed), target_modules=["fc1", "fc2"], progress=False))
    print("ready", flush=True)
    i = 0
    while True:
        cntlora.save_adapter(models[i % 2], {out!r}, overwrite=True)
        i += 1
""")


@pytest.mark.slow
def test_saves_killed_at_random_moments_lose_nothing(tmp_path):
    """24 kills of a process that saves in a loop: the folder always loads as one of the two adapters."""
    out = tmp_path / "adapter"
    x = feature_batches()[0]
    want = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = cntlora.initialize(TwoLayerMLP(), feature_batches(), CNTLoRAConfig(r=2, base="residual", seed=seed),
                               target_modules=["fc1", "fc2"], progress=False)
        with torch.no_grad():
            want.append(m(x))
    rng, kills = random.Random(0), 0
    for _ in range(24):
        proc = subprocess.Popen([sys.executable, "-c", SAVER.format(tests=str(TESTS), out=str(out))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if not out.exists():
            continue
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cntlora.files import recover_directory
            recover_directory(out)
            loaded = cntlora.load_adapter(TwoLayerMLP(), out)
        with torch.no_grad():
            got = loaded(x)
        assert any(torch.allclose(got, w, atol=1e-6) for w in want), "a killed save left a mixed folder"
        assert sorted(os.listdir(tmp_path)) == ["adapter"], f"debris after recovery: {os.listdir(tmp_path)}"
    print(f"{kills} saves killed, every folder intact")
