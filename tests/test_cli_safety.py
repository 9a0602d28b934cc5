"""The command line under bad input: one line and exit code 2, nothing deleted, nothing half-written."""

import json
import random
import shutil

import pytest
import torch

from test_cli import SENTENCES, WORDS, run_cli, workdir  # noqa: F401 (the tiny BERT folder fixture)


def _init(capsys, workdir, out, *extra):
    return run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--r", 2, "--quiet", *extra)


def test_init_refuses_an_existing_folder_and_overwrite_keeps_the_users_files(workdir, capsys, tmp_path):
    out = tmp_path / "adapter"
    assert _init(capsys, workdir, out)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = _init(capsys, workdir, out, "--mode", "cross")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "cntlora.json").read_text())["config"]["mode"] == "self"
    code, _, err = _init(capsys, workdir, out, "--mode", "cross", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "cntlora.json").read_text())["config"]["mode"] == "cross"
    assert (out / "notes.txt").read_text() == "mine"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    code, _, err = _init(capsys, workdir, user, "--overwrite")
    assert code == 2 and "not an adapter folder" in err
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]


def test_export_onto_its_source_is_refused(workdir, capsys, tmp_path):
    out = tmp_path / "adapter"
    assert _init(capsys, workdir, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for target in (out, tmp_path / "." / "adapter"):
        code, _, err = run_cli(capsys, "export", out, target, "--overwrite")
        assert code == 2 and "OUT is the adapter folder itself" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("flags", [
    ["--batch-size", "0"], ["--batch-size", "-1"], ["--max-length", "0"], ["--max-length", "-1"],
    ["--max-batches", "-1"], ["--max-batches", "0"], ["--max-stats-memory", "inf"], ["--max-stats-memory", "nan"],
    ["--calibration-size", "0"], ["--alpha", "nan"], ["--alpha", "inf"], ["--ridge", "inf"], ["--ridge", "nan"],
    ["--gamma", "nan"], ["--strength", "nan"], ["--strength", "inf"], ["--a-row-norm", "inf"], ["--r", "0"],
    ["--budget", "-5"], ["--svd-niter", "-1"], ["--timesteps-per-image", "0"],
])
def test_nonsense_values_give_one_line_and_write_nothing(workdir, capsys, tmp_path, flags):
    out = tmp_path / "adapter"
    code, _, err = _init(capsys, workdir, out, *flags)
    assert code == 2 and err.startswith("cntlora: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("damage", ["json", "nan-scale", "nan-alpha", "no-ranks", "weights"])
def test_inspect_on_a_damaged_folder_gives_one_line(workdir, capsys, tmp_path, damage):
    out = tmp_path / "adapter"
    assert _init(capsys, workdir, out)[0] == 0
    meta = json.loads((out / "cntlora.json").read_text())
    if damage == "json":
        (out / "cntlora.json").write_text("{oops")
    elif damage == "nan-scale":
        meta["scale"] = float("nan")
        (out / "cntlora.json").write_text(json.dumps(meta))
    elif damage == "nan-alpha":
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["lora_alpha"] = float("nan")
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    elif damage == "no-ranks":
        del meta["ranks"]
        (out / "cntlora.json").write_text(json.dumps(meta))
    else:
        (out / "adapter_model.safetensors").write_bytes(b"\x01" * 50)
    code, _, err = run_cli(capsys, "inspect", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


FLAGS = ["--r", "--alpha", "--mode", "--base", "--ridge", "--gamma", "--strength", "--vas", "--budget", "--r-min",
         "--r-max", "--seed", "--calibration-size", "--batch-size", "--max-length", "--max-batches", "--target-modules",
         "--pretrain-source", "--truncation", "--directions", "--a-row-norm", "--max-stats-memory", "--reference",
         "--overwrite", "--quiet", "--shift-floor", "--svd-niter", "--modules-to-save", "--load-stats"]
VALUES = ["0", "-1", "1", "2", "3", "1e400", "nan", "inf", "-inf", "none", "all", "self", "cross", "shift",
          "residual", "keep", "query", "nosuchlayer", "[", "", "x" * 300, "1GiB", "-3KiB", "objective", "generalized"]


def test_random_argument_lists_give_success_or_one_line(workdir, capsys, tmp_path):
    """200 random `init` command lines: each exits 0 with an adapter, or 2 with one line; never a traceback."""
    rng, outcomes = random.Random(0), {0: 0, 2: 0}
    for i in range(200):
        argv = []
        for _ in range(rng.randint(0, 5)):
            argv.append(rng.choice(FLAGS))
            if rng.random() < 0.8:
                argv.append(rng.choice(VALUES))
        out = tmp_path / f"a{i}"
        code, _, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--quiet",
                               "--calibration-size", "8", *argv)
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            assert err.startswith("cntlora: error:") and len(err.strip().splitlines()) == 1, (argv, err)
            assert not out.exists() or (out / "cntlora.json").exists(), (argv, "a half-written folder")
        else:
            assert (out / "cntlora.json").is_file()
        outcomes[code] += 1
        shutil.rmtree(out, ignore_errors=True)
    print(f"cntlora init on 200 random argument lists: {outcomes[0]} succeeded, {outcomes[2]} one-line errors")


def test_inspect_on_mutated_folders_gives_a_table_or_one_line(workdir, capsys, tmp_path):
    from test_fuzz import mutate

    good = tmp_path / "good"
    assert _init(capsys, workdir, good)[0] == 0
    rng, outcomes = random.Random(1), {0: 0, 2: 0}
    names = sorted(p.name for p in good.iterdir())
    for i in range(300):
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(good, case)
        victim = case / rng.choice(names)
        victim.write_bytes(mutate(victim.read_bytes(), rng))
        code, _, err = run_cli(capsys, "inspect", case)
        assert code in (0, 2) and "Traceback" not in err, (victim.name, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1, err
        outcomes[code] += 1
    print(f"cntlora inspect on 300 mutated folders: {outcomes[0]} printed, {outcomes[2]} one-line errors")


def test_diffusion_pipeline_folder_through_the_cli(capsys, tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from diffusion_helpers import tiny_pipeline, write_images

    _, pipeline_dir = tiny_pipeline(tmp_path)
    images = write_images(tmp_path / "images", count=2, size=16)
    classes = write_images(tmp_path / "classes", count=3, size=16, seed=1)
    code, stdout, err = run_cli(capsys, "init", pipeline_dir, images, "--prompt", "a photo of sks dog", "--reference",
                                classes, "--class-prompt", "a photo of a dog", "--mode", "cross", "--base", "keep",
                                "--r", 2, "--timesteps-per-image", 2, "--out", tmp_path / "adapter",
                                "--diffusers-out", tmp_path / "lora", "--quiet")
    assert code == 0, err
    assert "calibration: 2 images x 2 noise levels; reference: 3 images" in stdout
    meta = json.loads((tmp_path / "adapter" / "cntlora.json").read_text())
    assert meta["pretrain_source"] == "reference" and meta["config"]["mode"] == "cross"
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 10, cond).sample
        pipe.load_lora_weights(str(tmp_path / "lora"))
        after = pipe.unet(x, 10, cond).sample
    assert not torch.allclose(before, after), "base='keep' moves the output by s·B·A: the LoRA must be in effect"
    code, _, err = run_cli(capsys, "init", pipeline_dir, images, "--out", tmp_path / "b", "--load-stats", "x")
    assert code == 2 and "not supported for diffusion" in err
