"""The ViT suite: task generators, the harness Task, the ref= sample size, and the report's statistics."""

import json

import numpy as np
import pytest
import torch

from bench.quality.protocol import init_model
from bench.vit import plan, report, suite
from bench.vit.tasks import vit_task
from cntlora.config import CNTLoRAError


def _fm_test(n=60):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("task", ["sketch", "rotation", "count", "position", "size", "corruption"])
def test_structured_tasks_are_deterministic_and_labelled(task, monkeypatch):
    monkeypatch.setattr(suite, "N_TRAIN", 30)
    monkeypatch.setattr(suite, "N_VAL", 10)
    monkeypatch.setattr(suite, "N_TEST", 20)
    a = suite.make_task_arrays(task, _fm_test(), seed=3)
    b = suite.make_task_arrays(task, _fm_test(), seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["train_x"].shape == (30, 28, 28) and a["val_x"].shape == (10, 28, 28) and a["test_x"].shape == (20, 28, 28)
    assert a["train_x"].dtype == np.uint8
    classes = {"sketch": 10, "rotation": 4, "count": 4, "position": 9, "size": 4, "corruption": 5}[task]
    assert set(np.unique(np.concatenate([a["train_y"], a["test_y"]]))) <= set(range(classes))


def test_rotation_labels_match_the_rotation(monkeypatch):
    monkeypatch.setattr(suite, "N_TRAIN", 20)
    monkeypatch.setattr(suite, "N_VAL", 0)
    monkeypatch.setattr(suite, "N_TEST", 0)
    fm = _fm_test(1)
    fm = (np.repeat(fm[0], 5, 0), np.zeros(5, int))  # one item, so each image is a rotation of it
    a = suite.make_task_arrays("rotation", fm, seed=0)
    for x, k in zip(a["train_x"], a["train_y"]):
        assert np.array_equal(np.rot90(x, -k), fm[0][0])


def test_split_covers_every_group_and_every_task():
    assert sorted(plan.DEV + plan.CONFIRM) == sorted(suite.TASK_NAMES)
    for names in suite.GROUPS.values():
        assert any(t in plan.DEV for t in names) and any(t in plan.CONFIRM for t in names)


def _write_idx(folder, name, array, magic):
    import gzip

    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(folder / f"{name}.gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_the_packed_files_build_the_same_suite(tmp_path, monkeypatch):
    for name, value in (("N_TRAIN", 20), ("N_VAL", 5), ("N_TEST", 10), ("PRETRAIN_IMAGES", 50),
                        ("REFERENCE_SIZE", 8)):
        monkeypatch.setattr(suite, name, value)
    full = tmp_path / "full"
    full.mkdir()
    rng = np.random.default_rng(1)
    train_x = rng.integers(1, 256, (60, 28, 28), dtype=np.uint8)  # no zero image, so a zeroed one shows
    _write_idx(full, "train-images-idx3-ubyte", train_x, 2051)
    _write_idx(full, "train-labels-idx1-ubyte", rng.integers(0, 10, 60), 2049)
    test_x, test_y = _fm_test(40)
    _write_idx(full, "t10k-images-idx3-ubyte", test_x, 2051)
    _write_idx(full, "t10k-labels-idx1-ubyte", test_y, 2049)

    packed = suite.pack(full, tmp_path / "packed")
    kept = suite.fashion_mnist(packed, "train")[0]
    assert kept.shape == (50, 28, 28)
    nonzero = np.flatnonzero(kept.reshape(50, -1).any(1))
    assert sorted(nonzero) == sorted(suite.reference_indices())
    a = suite.build_suite(full, tmp_path / "a.npz", tasks=("rotation",))
    b = suite.build_suite(packed, tmp_path / "b.npz", tasks=("rotation",))
    assert suite.digest(a) == suite.digest(b)
    assert set(suite.digest(a)) == {"reference_x"} | {f"rotation/{k}" for k in
                                                      ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    with np.load(b) as z:
        np.testing.assert_array_equal(z["reference_x"], train_x[suite.reference_indices()])


@pytest.fixture
def tiny_suite(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"reference_x": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        arrays[f"rotation/{split}_x"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"rotation/{split}_y"] = rng.integers(0, 4, n)
    path = tmp_path / "suite.npz"
    np.savez(path, **arrays)
    return path


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               num_labels=10)).eval()


def test_vit_task_and_the_reference_sample_size(tiny_suite):
    task = vit_task("rotation", fewshot=True, model=_tiny_vit(), path=tiny_suite)
    assert task.name == "vit-rotation-fewshot" and len(task.train) == 24  # fewer than 100 held: all of them
    assert sum(len(b["labels"]) for b in task.reference_sample(5)) == 5
    assert sum(len(b["labels"]) for b in task.reference_sample()) == 20
    with pytest.raises(CNTLoRAError, match="ref=1..20"):
        task.reference_sample(21)
    model, _ = init_model(task, f"cntlora-cross@{plan.REF},ref=5", 0, torch.device("cpu"))
    assert model.cntlora_plan.pretrain_source == "reference"
    with pytest.raises(CNTLoRAError, match="add pretrain_source=reference"):
        init_model(task, "cntlora-cross@ref=5", 0, torch.device("cpu"))
    with pytest.raises(CNTLoRAError, match="unknown suite task"):
        vit_task("nope", model=_tiny_vit(), path=tiny_suite)


def test_missing_suite_file_names_the_command(tmp_path):
    with pytest.raises(CNTLoRAError, match="python -m bench.vit.suite"):
        vit_task("rotation", model=_tiny_vit(), path=tmp_path / "absent.npz")


def _log(path, accs, lr=0.001, mode="w"):
    """A run log with one lr per label (so the chosen lr is that one); mode "a" adds to a log."""
    with open(path, mode) as f:
        for (label, task, fewshot), by_seed in accs.items():
            spec = f"vit-{task}" + ("-fewshot" if fewshot else "")
            f.write(json.dumps({"kind": "meta", "spec": spec, "data": {"metric": "accuracy", "higher_is_better": True,
                                                                      "steps": 1, "train_size": 1}}) + "\n")
            for seed, acc in by_seed.items():
                f.write(json.dumps({"kind": "run", "spec": spec, "data": {"label": label, "seed": seed, "lr": lr,
                                                                         "steps": 1, "val": {"1": acc}, "test": acc}}) + "\n")


def _four_labels(rng):
    """Every cell and seed of four labels, 1 point apart (default < gaussian < self < cross), noise 1 point."""
    offsets = {"default": 0.0, "gaussian": 0.01, "cntlora-self": 0.02, f"cntlora-cross@{plan.REF}": 0.03}
    return {(label, t, f): {s: 0.5 + off + 0.01 * rng.standard_normal() for s in plan.SEEDS}
            for label, off in offsets.items() for t in plan.TASK_ORDER for f in (False, True)}


def test_report_applies_the_rule_and_its_intervals(tmp_path):
    rng = np.random.default_rng(0)
    accs = _four_labels(rng)
    _log(tmp_path / "runs.jsonl", accs)
    result = report.analyse(report.accuracies([tmp_path / "runs.jsonl"]))
    assert result["fixed"] == f"cntlora-cross@{plan.REF}"
    primary = result["primary"]
    assert primary["baseline"] == "gaussian"
    assert abs(primary["mean"] - 0.02) < 0.01
    assert primary["bootstrap95"][0] < primary["mean"] < primary["bootstrap95"][1]
    assert primary["bootstrap95"][0] > 0  # a 2-point edge with 1-point noise over 50 cells is resolved
    assert set(result["secondary"]["both"]) == {"default", "gaussian"}
    chosen = {}
    report.accuracies([tmp_path / "runs.jsonl"], chosen)
    choices = report.lr_choices(chosen)["default"]  # the log holds one lr, the grid's lowest, in all 20 cells
    assert choices == {"counts": {"0.001": 20, "0.003": 0, "0.01": 0}, "edge": 1.0}
    row = result["tables"]["confirm/both"]["default"]
    assert row["bootstrap95"][0] < row["average"] < row["bootstrap95"][1]  # the tasks × seeds interval
    assert result["premise"]["confirm"]["cross(true) - self"]["mean"] == pytest.approx(0.01, abs=0.01)
    assert "not run" in report.markdown(result)  # the proxies were not in this log
    # a follow-up label, better than every other, gets its own rule and never changes the main one
    follow = plan.FOLLOWUP[0]
    accs.update({(follow, t, f): {s: 0.6 + 0.01 * rng.standard_normal() for s in plan.SEEDS}
                 for t in plan.TASK_ORDER for f in (False, True)})
    _log(tmp_path / "runs.jsonl", accs)
    result = report.analyse(report.accuracies([tmp_path / "runs.jsonl"]))
    assert result["fixed"] == f"cntlora-cross@{plan.REF}" and result["followup"]["fixed"] == follow
    assert result["followup"]["vs_best_peft"]["baseline"] == "gaussian"
    assert result["followup"]["vs_fixed"]["mean"] == pytest.approx(0.07, abs=0.01)
    assert "Follow-up" in report.markdown(result)
    # the layers study: its own rule, and each label against its "energy" twin on both halves
    shifted, twin = plan.LAYERS[0], plan.TWINS[plan.LAYERS[0]]
    accs.update({(label, t, f): {s: base + 0.01 * rng.standard_normal() for s in plan.SEEDS}
                 for label, base in ((shifted, 0.55), (twin, 0.52)) for t in plan.TASK_ORDER for f in (False, True)})
    _log(tmp_path / "runs.jsonl", accs)
    result = report.analyse(report.accuracies([tmp_path / "runs.jsonl"]))
    assert result["fixed"] == f"cntlora-cross@{plan.REF}" and result["followup"]["fixed"] == follow
    assert result["layers"]["fixed"] == shifted
    assert result["layers"]["vs_twin"]["dev"][f"{shifted} − {twin}"]["mean"] == pytest.approx(0.03, abs=0.01)
    assert "Which layers: VAS ranks by input shift" in report.markdown(result)
    out = report.plot(result, tmp_path)
    assert all(p.stat().st_size > 0 for p in out)


def test_a_cut_run_gets_no_fixed_setting_and_names_what_did_not_finish(tmp_path):
    # every core label has seed 0 on the 1k cells of the development half; nothing has seeds 1-4,
    # so no table, rule or comparison applies, and every label is listed with what it holds
    accs = {(label, t, False): {0: 0.5 + 0.01 * i} for i, label in enumerate(plan.CORE_LABELS) for t in plan.DEV}
    _log(tmp_path / "runs.jsonl", accs)
    result = report.analyse(report.accuracies([tmp_path / "runs.jsonl"]))
    assert "fixed" not in result and "primary" not in result and not result["tables"]["dev/both"]
    missing = result["incomplete"]["dev"]
    assert set(missing) == set(plan.DEV_LABELS)
    assert missing["default"] == [5, 50] and missing["cntlora-self-vas"] == [0, 50]
    assert not any(result["structure"].values())
    assert "Not complete on the dev half" in report.markdown(result)
    assert report.plot(result, tmp_path) == []


def test_structure_separates_the_method_from_the_method_on_a_cell(tmp_path):
    # additive: label i adds 0.01 i everywhere, each cell its own level, seeds ±0.002; no interaction
    labels = plan.PEFT_METHODS[:4]
    level = {c: 0.05 * k for k, c in enumerate(report.cells(plan.DEV))}
    wiggle = [-0.002, -0.001, 0.0, 0.001, 0.002]
    accs = {(label, t, f): {s: 0.5 + 0.01 * i + level[(t, f)] + wiggle[s] for s in plan.SEEDS}
            for i, label in enumerate(labels) for (t, f) in level}
    _log(tmp_path / "runs.jsonl", accs)
    st = report.structure(report.accuracies([tmp_path / "runs.jsonl"]), plan.DEV)
    assert st["labels"] == 4 and st["cells"] == 10
    assert st["method_sd"] == pytest.approx(float(np.std([0, 0.01, 0.02, 0.03], ddof=1)))
    assert st["interaction_sd"] == pytest.approx(0.0, abs=1e-9)
    assert st["cell_noise_sd"] == pytest.approx(float(np.sqrt(np.var(wiggle, ddof=1) / 5)))
    left = report.structure(report.accuracies([tmp_path / "runs.jsonl"]), plan.DEV, leave_out=[labels[3]])
    assert left["labels"] == 3 and left["method_sd"] == pytest.approx(0.01)
    # one label gains on one cell only: an interaction, seen beyond the noise
    accs[(labels[0], "photos", False)] = {s: v + 0.05 for s, v in accs[(labels[0], "photos", False)].items()}
    _log(tmp_path / "runs.jsonl", accs)
    st = report.structure(report.accuracies([tmp_path / "runs.jsonl"]), plan.DEV)
    # brute force: the bumped cell's residuals sum to 0.05² (1 - 1/4)(1 - 1/10) over (4 - 1)(10 - 1) degrees of freedom
    inter2 = 0.05 ** 2 * 0.75 * 0.9 / 27
    assert st["interaction_sd"] == pytest.approx(np.sqrt(inter2))
    assert st["interaction_sd_beyond_noise"] == pytest.approx(np.sqrt(inter2 - np.var(wiggle, ddof=1) / 5))


def test_premise_per_task_ranks_against_the_shift_and_the_size_sweep_uses_the_confirmation_cells(tmp_path):
    excess = {t: float(k) for k, t in enumerate(plan.TASK_ORDER)}
    ref = plan.REF
    accs = {}
    for t in plan.TASK_ORDER:
        for f in (False, True):
            accs[("cntlora-self", t, f)] = {s: 0.6 for s in plan.SEEDS}
            accs[(f"cntlora-cross@{ref}", t, f)] = {s: 0.6 + 0.001 * excess[t] for s in plan.SEEDS}
            accs[(f"cntlora-shift@{ref}", t, f)] = {s: 0.6 - 0.001 * excess[t] for s in plan.SEEDS}
    for t in plan.CONFIRM:
        accs[(f"cntlora-cross@{ref},ref=64", t, False)] = {s: 0.5 for s in plan.SEEDS}
    _log(tmp_path / "runs.jsonl", accs)
    result = report.analyse(report.accuracies([tmp_path / "runs.jsonl"]), excess)
    by_task = result["premise_by_task"]
    assert set(by_task) == {"cross(true) - self", "shift(true) - self"}  # the proxies did not run
    assert by_task["cross(true) - self"]["spearman"] == pytest.approx(1.0)
    assert by_task["shift(true) - self"]["spearman"] == pytest.approx(-1.0)
    assert by_task["cross(true) - self"]["tasks"]["size"] == pytest.approx(0.001 * excess["size"])
    sizes = result["sizes"]
    assert sizes["cross"][64]["average"] == pytest.approx(0.5)
    mean_confirm = np.mean([0.6 + 0.001 * excess[t] for t in plan.CONFIRM])
    assert sizes["cross"][4096]["average"] == pytest.approx(mean_confirm)  # the same cells as the sweep
    assert sizes["shift"][64] is None and sizes["others"]["cntlora-self"]["average"] == pytest.approx(0.6)
    text = report.markdown(result)
    assert "Premise per task" in text and "True-sample size" in text
    assert {p.name for p in report.plot(result, tmp_path)} == {"suite-average.png", "sample-size.png", "premise-shift.png"}


def test_the_one_call_order_runs_every_label_once_per_cell_core_first():
    specs = plan.priority_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    covered = {}
    for s in specs:
        if not s.name.endswith("-sizes"):
            for label in s.methods:
                key = (label, s.task_kwargs["suite"], s.task_kwargs["fewshot"])
                assert key not in covered
                covered[key] = s.name
    assert set(covered) == {(label, t, f) for label in plan.DEV_LABELS for t in plan.TASK_ORDER for f in (False, True)}
    first_extra = next(i for i, s in enumerate(specs) if s.name.endswith("-more"))
    first_sizes = next(i for i, s in enumerate(specs) if s.name.endswith("-sizes"))
    assert all(set(s.methods) == set(plan.CORE_LABELS) for s in specs[:first_sizes])
    assert [s.task_kwargs["suite"] in plan.DEV for s in specs[:first_sizes]] == [True] * 10 + [False] * 10
    assert first_sizes < first_extra and all(s.name.endswith("-more") for s in specs[first_extra:])


def test_the_follow_up_runs_its_labels_once_per_cell_development_first(tiny_suite):
    specs = plan.followup_specs()
    assert all(s.name.endswith("-followup") and s.methods == plan.FOLLOWUP for s in specs)
    assert [s.task_kwargs["suite"] in plan.DEV for s in specs] == [True] * 10 + [False] * 10
    assert {(s.task_kwargs["suite"], s.task_kwargs["fewshot"]) for s in specs} == {
        (t, f) for t in plan.TASK_ORDER for f in (False, True)}
    assert not set(plan.FOLLOWUP) & set(plan.DEV_LABELS)
    task = vit_task("rotation", model=_tiny_vit(), path=tiny_suite)
    for label in plan.FOLLOWUP:  # every label initializes, with the reference sample where it asks for one
        model, _ = init_model(task, label, 0, torch.device("cpu"))
        base = label.split("base=")[1].split(",")[0] if "base=" in label else "subspace"
        assert model.cntlora_plan.config.base == base
        assert model.cntlora_plan.config.pretrain_source == ("reference" if plan.REF in label else None)


def test_the_layers_study_runs_shift_ranked_vas_against_its_twins(tiny_suite):
    specs = plan.study_specs("layers")
    assert all(s.name.endswith("-layers") and s.methods == plan.LAYERS for s in specs) and len(specs) == 20
    assert not set(plan.LAYERS) & set(plan.DEV_LABELS + plan.FOLLOWUP)
    assert set(plan.TWINS) == set(plan.LAYERS) and set(plan.TWINS.values()) <= set(plan.DEV_LABELS)
    task = vit_task("rotation", model=_tiny_vit(), path=tiny_suite)
    for label in plan.LAYERS:  # every label initializes, ranks by the true sample's shift, and keeps the budget
        plan_ = init_model(task, label, 0, torch.device("cpu"))[0].cntlora_plan
        assert plan_.config.advanced.vas_score == "shift" and plan_.pretrain_source == "reference"
        assert all(lp.input_shift > 0 for lp in plan_.layers.values()) and plan_.params <= plan_.budget


def test_edge_specs_extend_only_the_labels_at_an_edge_one_step():
    chosen = {"default": {("photos", False): 1e-2, ("digits", False): 3e-3}, "corda": {("photos", True): 1e-3}}
    specs = plan.edge_specs(chosen)
    names = [s.name for s in specs]
    assert names == [s.name for s in plan.priority_specs(()) + plan.followup_specs()] and len(set(names)) == len(names)
    by_name = {s.name: s for s in specs}
    assert by_name["vit-photos"].label_lrs == {"default": [1e-3, 3e-3, 1e-2, 3e-2]}
    assert by_name["vit-photos"].lrs_of("corda") == list(plan.LRS)
    assert by_name["vit-photos-fewshot"].label_lrs == {"corda": [3e-4, 1e-3, 3e-3, 1e-2]}
    assert all(not s.label_lrs for s in specs if s.name not in ("vit-photos", "vit-photos-fewshot"))


def test_run_edges_needs_the_logs_it_extends(tmp_path, capsys):
    from bench.vit import run

    with pytest.raises(SystemExit) as e:
        run.main(["edges", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_report_keeps_the_registered_grid_and_adds_the_edge_extended_result(tmp_path):
    _log(tmp_path / "runs.jsonl", _four_labels(np.random.default_rng(0)))
    # default at an lr past the grid's low edge, better everywhere
    _log(tmp_path / "runs.jsonl", {("default", t, f): {s: 0.6 for s in plan.SEEDS} for t in plan.TASK_ORDER
                                   for f in (False, True)}, lr=3e-4, mode="a")
    assert report.main([str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert result["primary"]["baseline"] == "gaussian"  # the registered grid: the 3e-4 runs do not count
    assert result["edge_extended"]["primary"]["baseline"] == "default"
    assert result["edge_extended"]["primary"]["mean"] == pytest.approx(0.53 - 0.6, abs=0.01)
    moves = result["edge_extended"]["moves"]
    assert set(moves) == {"default"} and moves["default"]["tried"] == 2 * len(plan.TASK_ORDER)
    assert set(moves["default"]["moved"].values()) == {3e-4} and len(moves["default"]["moved"]) == 2 * len(plan.TASK_ORDER)
    assert result["edge_extended"]["secondary"]["both"]["default"]["mean"] == pytest.approx(0.53 - 0.6, abs=0.01)
    text = (tmp_path / "out" / "suite.md").read_text()
    assert "With the lr grid extended past its edges" in text and "| default | 20 | 20 |" in text


def test_the_committed_pretrained_vit_loads_as_its_record_says():
    from safetensors import safe_open

    from bench.vit.model import ARTIFACT, CONFIG, load_pretrained

    record = json.loads((ARTIFACT / "pretrain.json").read_text())
    assert record["config"] == CONFIG and record["data"].startswith("Fashion-MNIST train, the first 50,000")
    with safe_open(str(ARTIFACT / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = load_pretrained()
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert json.loads((ARTIFACT / "evaluation.json").read_text())["test_accuracy"] > 0.8
    x = torch.rand(2, 1, 28, 28)
    assert model(pixel_values=x).logits.shape == (2, 10)


def test_excess_is_one_without_shift_and_finds_an_over_represented_direction():
    from bench.vit.shift import excess

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.5])
    pre = x.T @ x / len(x)
    assert excess(pre, pre, top=1, ridge=0.0) == pytest.approx(1.0)
    assert excess(2.5 * pre, pre, top=6, ridge=0.0) == pytest.approx(1.0)  # the scale does not count
    # fine-tuning doubles one direction's energy; brute force: the largest eigenvalue of C_p^-1 C_f
    v = torch.tensor([0.0, 0, 0, 0, 1, 0], dtype=torch.float64)
    fine = pre + pre[4, 4] * torch.outer(v, v)
    fine_n, pre_n = fine / fine.trace(), pre / pre.trace()
    brute = torch.linalg.eigvals(torch.linalg.solve(pre_n, fine_n)).real.max()
    assert excess(fine, pre, top=1, ridge=0.0) == pytest.approx(float(brute), rel=1e-9)
    assert excess(fine, pre, top=1, ridge=0.0) > 1.5


def test_complete_cells_get_a_five_seed_table_and_paired_premise(tmp_path):
    # every core label has 5 seeds on photos (1k); on digits (1k) one label lacks seed 4, so only photos counts
    accs = {(label, "photos", False): {s: 0.5 + 0.01 * i + 0.001 * s for s in plan.SEEDS}
            for i, label in enumerate(plan.CORE_LABELS)}
    accs.update({(label, "digits", False): {s: 0.7 for s in plan.SEEDS} for label in plan.CORE_LABELS})
    accs[(plan.CORE_LABELS[0], "digits", False)] = {s: 0.7 for s in range(4)}
    _log(tmp_path / "runs.jsonl", accs)
    result = report.analyse(report.accuracies([tmp_path / "runs.jsonl"]))
    assert list(result["complete"]) == ["dev"]
    table = result["complete"]["dev"]["table"]
    assert list(table) == plan.CORE_LABELS[::-1]
    assert all(list(row["cells"]) == ["photos"] for row in table.values())
    assert table["default"]["average"] == pytest.approx(0.5 + 0.01 * plan.CORE_LABELS.index("default") + 0.002)
    gap = plan.CORE_LABELS.index(f"cntlora-cross@{plan.REF}") - plan.CORE_LABELS.index("cntlora-self")
    assert result["complete"]["dev"]["premise"]["cross(true) - self"]["mean"] == pytest.approx(0.01 * gap)
    assert "Complete cells, dev half" in report.markdown(result)


def test_read_shares_match_brute_force_on_small_matrices():
    from bench.vit.directions import read_shares

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.5])
    pre = x.T @ x / len(x)
    vals, vecs = torch.linalg.eigh(pre)
    # any basis of C_f's top-2 eigenvectors reads all it can; with C_f = C_p nothing is over-represented
    a = torch.randn(2, 2, generator=g, dtype=torch.float64) @ vecs[:, -2:].T
    shares = read_shares(a, pre, pre)
    assert shares["fine_read"] == pytest.approx(1.0) and shares["excess_read"] == pytest.approx(1.0)
    # the bottom-2 eigenvectors read the sum of the two smallest eigenvalues over that of the two largest
    assert read_shares(vecs[:, :2].T, pre, pre)["fine_read"] == pytest.approx(float(vals[:2].sum() / vals[-2:].sum()))
    # fine-tuning doubles direction e4's energy: brute force from the definitions, with A = e4 (r = 1)
    e4 = torch.eye(6, dtype=torch.float64)[4:5]
    fine = pre + pre[4, 4] * torch.outer(e4[0], e4[0])
    shares = read_shares(3.0 * e4, fine, pre)  # A's scale does not count
    assert shares["excess_read"] == pytest.approx(float((fine[4, 4] / fine.trace()) / (pre[4, 4] / pre.trace())))
    assert shares["excess_read"] == pytest.approx(float(2 * pre.trace() / (pre.trace() + pre[4, 4])))
    assert shares["fine_read"] == pytest.approx(float(fine[4, 4] / torch.linalg.eigvalsh(fine)[-1]))


def test_every_spec_name_of_the_plan_maps_to_its_cell():
    specs = plan.priority_specs() + [spec for study in plan.STUDIES for spec in plan.study_specs(study)]
    for spec in specs:
        task, fewshot = report.cell_of(spec.name)
        assert task == spec.task_kwargs["suite"] and fewshot == spec.task_kwargs["fewshot"]
    assert {s.name.split("-")[-1] for s in specs} >= {"more", "followup", "layers", "sizes", "fewshot"}


def test_the_layers_allocation_report_keeps_each_budget_and_draws_it(tiny_suite, tmp_path):
    from bench.vit import layers

    results = layers.allocations(("rotation",), path=tiny_suite, model_fn=_tiny_vit)
    labels = list(results["rotation"])
    assert labels == [x for label in plan.LAYERS for x in (plan.TWINS[label], label)]
    for label, allocation in results["rotation"].items():
        shifted = "vas_score=shift" in label
        assert all((d["shift"] is not None) == shifted for d in allocation.values())
        assert sum(d["rank"] for d in allocation.values()) > 0
    kinds = layers.by_kind(results["rotation"][labels[0]])
    assert sum(len(v) for v in kinds.values()) == len(results["rotation"][labels[0]])
    written = layers.write(results, tmp_path)
    assert all(p.stat().st_size > 0 for p in written)
    text = (tmp_path / "layers.md").read_text()
    assert all(f"| rotation | {label} |" in text for label in labels)
