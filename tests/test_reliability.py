"""Nothing lost: saves never delete what cntlora did not write, and a killed save is recovered."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cntlora
from cntlora import CNTLoRAConfig, CNTLoRAError
from cntlora.files import JOURNAL, atomic_write, recover_directory

from helpers import TwoLayerMLP, feature_batches

TESTS = Path(__file__).parent


def _adapter(base="subspace", seed=0):
    torch.manual_seed(seed)
    cfg = CNTLoRAConfig(r=2, base=base, seed=seed)
    return cntlora.initialize(TwoLayerMLP(), feature_batches(), cfg, target_modules=["fc1", "fc2"], progress=False)


def _out(model):
    with torch.no_grad():
        return model(feature_batches()[0])


def test_an_existing_folder_needs_overwrite_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "adapter"
    cntlora.save_adapter(_adapter("residual"), out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-10.pt").write_bytes(b"weights")
    (out / "README.md").write_text("my own card")
    with pytest.raises(CNTLoRAError, match="overwrite=True"):
        cntlora.save_adapter(_adapter(), out)
    second = _adapter("subspace", seed=1)
    cntlora.save_adapter(second, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "step-10.pt").read_bytes() == b"weights"
    assert (out / "README.md").read_text() == "my own card"
    assert not (out / "residual_base.safetensors").exists(), "the earlier save's residual base is stale"
    torch.manual_seed(0)
    loaded = cntlora.load_adapter(TwoLayerMLP(), out)
    torch.testing.assert_close(_out(loaded), _out(second))


def test_export_refuses_a_cntlora_adapter_folder(tmp_path):
    model = _adapter()
    cntlora.save_adapter(model, tmp_path / "a")
    before = {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")}
    with pytest.raises(CNTLoRAError, match="export into another folder"):
        cntlora.export_plain_lora(model, tmp_path / "a", overwrite=True)
    assert {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")} == before


KILLED_SAVE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import cntlora
    from helpers import TwoLayerMLP, feature_batches
    torch.manual_seed(1)
    model = cntlora.initialize(TwoLayerMLP(), feature_batches(), cntlora.CNTLoRAConfig(r=2, seed=1),
                               target_modules=["fc1", "fc2"], progress=False)
    real, moved = os.replace, []
    def replace(src, dst):
        if ".tmp-" in os.path.basename(os.path.dirname(src)):
            if len(moved) == {after}:
                os._exit(9)  # killed part-way through the swap: no cleanup runs
            moved.append(src)
        real(src, dst)
    os.replace = replace
    cntlora.save_adapter(model, {out!r}, overwrite=True)
""")


@pytest.mark.parametrize("after", [0, 2])
def test_a_save_killed_during_the_swap_is_finished_by_the_next_load(tmp_path, after):
    out = tmp_path / "adapter"
    cntlora.save_adapter(_adapter(seed=0), out)
    script = KILLED_SAVE.format(tests=str(TESTS), out=str(out), after=after)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert (out / JOURNAL).exists()
    with pytest.warns(UserWarning, match="interrupted save"):
        torch.manual_seed(0)
        loaded = cntlora.load_adapter(TwoLayerMLP(), out)
    torch.testing.assert_close(_out(loaded), _out(_adapter(seed=1)))
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "debris left next to the folder"
    assert not (out / JOURNAL).exists()


def test_debris_of_killed_writes_is_removed_and_reported(tmp_path):
    (tmp_path / ".adapter.tmp-0123456789ab").mkdir()
    (tmp_path / ".adapter.tmp-0123456789ab" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-abcstats.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="leftover"):
        cntlora.save_adapter(_adapter(), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="leftover"):
        atomic_write(str(tmp_path / "stats.safetensors"), lambda tmp: Path(tmp).write_bytes(b"x"))
    assert sorted(os.listdir(tmp_path)) == ["adapter", "stats.safetensors"]


def test_a_folder_set_aside_by_a_killed_replace_is_restored(tmp_path):
    aside = tmp_path / ".adapter.old-0123456789ab"
    cntlora.save_adapter(_adapter(), aside)
    with pytest.warns(UserWarning, match="restored"):
        assert recover_directory(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "cntlora.json").exists() and not aside.exists()
    json.loads((tmp_path / "adapter" / "cntlora.json").read_text())


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(12, 12), torch.nn.Linear(12, 12)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_residual_refuses_weights_shared_with_another_module():
    residual = CNTLoRAConfig(r=2, base="residual", strength=None)
    model = _Shared()
    before = model.a.weight.detach().clone()
    with pytest.raises(CNTLoRAError, match="shared with"):
        cntlora.initialize(model, feature_batches(), residual, target_modules=["a"], progress=False)
    assert torch.equal(model.a.weight, before), "the shared weight changed"
    cntlora.initialize(_Shared(), feature_batches(), CNTLoRAConfig(r=2), target_modules=["a", "b"], progress=False)


def test_residual_on_a_tied_lm_head_is_refused():
    from helpers import tiny_gpt2, token_batches

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.raises(CNTLoRAError, match="tied weights"):
        cntlora.initialize(model, token_batches(), CNTLoRAConfig(r=2, base="residual"), target_modules=["lm_head"],
                           progress=False)
    assert torch.equal(model.transformer.wte.weight, wte)


def test_residual_keeps_the_output_of_a_module_called_twice():
    model = _Twice()
    x = feature_batches()[0]
    with torch.no_grad():
        want = model(x)
    peft_model = cntlora.initialize(model, feature_batches(), CNTLoRAConfig(r=2, base="residual", strength=None),
                                    target_modules=["fc", "out"], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), want, atol=1e-5, rtol=0)


def _saved_stats(tmp_path):
    stats = cntlora.collect_statistics(TwoLayerMLP(), feature_batches(), ["fc1", "fc2"],
                                       reference_dataloader=feature_batches(seed=5), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    return stats, path


def _rewrite(path, edit_tensors=None, edit_meta=None, out=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(out or path), metadata=meta)


def _scale_counts(tensors):
    for k in tensors:
        if k.endswith("/count"):
            tensors[k] = tensors[k] * 1000


def _put_inf(tensors):
    key = next(k for k in tensors if k.endswith("/outer"))
    tensors[key][0, 0] = float("inf")


@pytest.mark.parametrize("edit_tensors, edit_meta, match", [
    (_scale_counts, None, "checksum"),
    (_put_inf, None, "checksum"),
    (None, lambda m: m.update(version="7"), "version '7' is unknown"),
    (None, lambda m: m.update(layers="{"), "checksum"),
])
def test_edited_statistics_are_refused(tmp_path, edit_tensors, edit_meta, match):
    _, path = _saved_stats(tmp_path)
    _rewrite(path, edit_tensors, edit_meta)
    with pytest.raises(CNTLoRAError, match=match):
        cntlora.Statistics.load(path)


def test_statistics_without_a_checksum_load_but_implausible_sums_do_not(tmp_path):
    stats, path = _saved_stats(tmp_path)

    def as_version_1(meta):
        meta["version"] = "1"
        meta.pop("checksum", None)

    _rewrite(path, None, as_version_1)
    loaded = cntlora.Statistics.load(path)
    assert torch.equal(loaded.fine["fc1"].outer, stats.fine["fc1"].outer.cpu())
    for edit, match in ((_put_inf, "NaN or Inf"), (lambda t: t.update({k: -t[k] for k in t if k.endswith("/count")}),
                                                   "must be positive")):
        _rewrite(path, edit, as_version_1, out=tmp_path / "bad.safetensors")
        with pytest.raises(CNTLoRAError, match=match):
            cntlora.Statistics.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", "foreign", "text"])
def test_damaged_statistics_files_give_one_clear_error(tmp_path, damage):
    from safetensors.torch import save_file

    _, path = _saved_stats(tmp_path)
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    elif damage == "foreign":
        save_file({"w": torch.zeros(3)}, str(path))
    else:
        path.write_text('{"hello": "world"}')
    with pytest.raises(CNTLoRAError):
        cntlora.Statistics.load(path)


def test_a_residual_adapter_refuses_another_checkpoint_of_the_same_shape(tmp_path):
    cntlora.save_adapter(_adapter("residual"), tmp_path / "a")
    other = TwoLayerMLP(seed=7)
    before = other.fc1.weight.detach().clone()
    with pytest.raises(CNTLoRAError, match="differ from the checkpoint"):
        cntlora.load_adapter(other, tmp_path / "a")
    assert torch.equal(other.fc1.weight, before), "the weights were overwritten before the check"
    torch.manual_seed(0)
    cntlora.load_adapter(TwoLayerMLP(), tmp_path / "a")


@pytest.mark.parametrize("damage", ["truncate-factors", "flip-residual", "bad-json", "empty-json", "bad-weights",
                                    "drop-layer"])
def test_damaged_adapter_folders_give_one_clear_error(tmp_path, damage):
    out = tmp_path / "a"
    cntlora.save_adapter(_adapter("residual"), out)
    if damage == "truncate-factors":
        data = (out / "init_factors.safetensors").read_bytes()
        (out / "init_factors.safetensors").write_bytes(data[:40])
    elif damage == "flip-residual":
        data = bytearray((out / "residual_base.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (out / "residual_base.safetensors").write_bytes(bytes(data))
    elif damage == "bad-json":
        (out / "cntlora.json").write_text("{not json")
    elif damage == "empty-json":
        (out / "cntlora.json").write_text("[]")
    elif damage == "bad-weights":
        (out / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    else:
        meta = json.loads((out / "cntlora.json").read_text())
        meta["layers"]["fc1"].pop("spec")
        (out / "cntlora.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    base = TwoLayerMLP()
    before = base.fc1.weight.detach().clone()
    with pytest.raises(CNTLoRAError):
        cntlora.load_adapter(base, out)
    assert torch.equal(base.fc1.weight, before) or damage == "bad-weights"


@pytest.mark.parametrize("batches, match", [
    ([torch.randn(8, 5)], "forward pass failed on"),                      # wrong feature size
    ([torch.randint(0, 5, (8, 12))], "forward pass failed on"),           # integer features
    ([["some", "strings"]], "forward pass failed on"),                    # strings
])
def test_batches_that_do_not_fit_the_model_give_one_clear_error(batches, match):
    with pytest.raises(CNTLoRAError, match=match):
        cntlora.collect_statistics(TwoLayerMLP(), batches, ["fc1"], progress=False)


def test_sequences_longer_than_the_models_positions_give_one_clear_error():
    from helpers import tiny_gpt2

    long = {"input_ids": torch.randint(0, 100, (2, 200))}  # tiny_gpt2 has 64 positions
    with pytest.raises(CNTLoRAError, match="forward pass failed"):
        cntlora.collect_statistics(tiny_gpt2(), [long], ["c_attn"], progress=False)


def test_an_invalid_regex_and_a_meta_model_give_one_clear_error():
    with pytest.raises(CNTLoRAError, match="not a valid regular expression"):
        cntlora.collect_statistics(TwoLayerMLP(), feature_batches(), "fc[", progress=False)
    with torch.device("meta"):
        meta = TwoLayerMLP()
    with pytest.raises(CNTLoRAError, match="meta device"):
        cntlora.collect_statistics(meta, feature_batches(), ["fc1"], progress=False)


def test_a_nan_weight_is_named():
    model = TwoLayerMLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")  # the inputs of fc2 stay finite
    stats = cntlora.collect_statistics(model, feature_batches(), ["fc1", "fc2"], progress=False)
    with pytest.raises(CNTLoRAError, match=r"\['fc2'\] hold NaN or Inf"):
        cntlora.solve(model, stats, CNTLoRAConfig(r=2, pretrain_source="isotropic"))


def test_all_zero_inputs_say_that_no_ridge_can_help():
    zeros = [torch.zeros(8, 12)]
    model = TwoLayerMLP()
    stats = cntlora.collect_statistics(model, zeros, ["fc1"], progress=False)
    with pytest.raises(CNTLoRAError, match="no ridge can help"):
        cntlora.solve(model, stats, CNTLoRAConfig(r=2))


def test_inputs_that_overflow_float32_squares_are_accumulated_wider():
    big = [b * 1e20 for b in feature_batches()]  # finite, but x² overflows float32
    model = TwoLayerMLP()
    stats = cntlora.collect_statistics(model, big, ["fc1"], progress=False, stats_dtype=torch.float64)
    assert torch.isfinite(stats.fine["fc1"].outer).all()
    plain = cntlora.collect_statistics(model, feature_batches(), ["fc1"], progress=False)
    cfg = CNTLoRAConfig(r=2)
    # Self under the relative ridge does not depend on the scale of the inputs
    got = cntlora.solve(model, stats, cfg).layers["fc1"]
    want = cntlora.solve(model, plain, cfg).layers["fc1"]
    torch.testing.assert_close((got.B @ got.A).double(), (want.B @ want.A).double(), atol=1e-5, rtol=1e-4)
