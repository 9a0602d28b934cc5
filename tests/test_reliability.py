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
