"""The quality benchmark's harness: --quick on a tiny task (CI smoke test) and its statistics."""

import json
import math

import pytest
import torch
from torch import nn

from bench.quality import command, protocol, report, stats
from bench.quality.baselines import METHODS, ChannelLinear, convs_to_linear, peft_init
from bench.quality.report import summarize
from bench.quality.stats import paired_difference, t_quantile
from bench.quality.task import parse_label, resolve_label
from bench.quality.tasks import make_task
from cntlora import CNTLoRAConfig, CNTLoRAError
from cntlora.training import batch_order


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_cli_every_method_writes_schema(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--task", "tiny", "--quick", "--out", str(tmp_path)])
    assert command.run(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"tasks"}
    entry = summary["tasks"]["tiny-quick"]
    assert set(entry) == {"metric", "higher_is_better", "steps", "methods"}
    assert isinstance(entry["metric"], str) and isinstance(entry["higher_is_better"], bool)
    assert isinstance(entry["steps"], int) and entry["steps"] > 0
    assert list(entry["methods"]) == METHODS
    for name, m in entry["methods"].items():
        assert set(m) == {"lr", "test_mean", "test_std", "seeds", "steps_to_target", "init_seconds"}, name
        assert all(_finite(m[k]) for k in ("lr", "test_mean", "test_std", "init_seconds")), (name, m)
        assert isinstance(m["seeds"], int) and m["seeds"] == 1
        assert m["steps_to_target"] is None or (isinstance(m["steps_to_target"], int) and m["steps_to_target"] > 0)
    raw = json.loads((tmp_path / "quality-tiny-quick.json").read_text())
    for run in raw["results"]["runs"]:
        assert len(run["train_loss"]) == entry["steps"] and all(_finite(v) for v in run["train_loss"])
        assert all(_finite(v) for v in run["val"].values()) and _finite(run["test"])
    # every method trains the same number of parameters (uniform rank, same head)
    assert len({r["trainable_params"] for r in raw["results"]["runs"] if "vas" not in r["label"]
                and r["label"] != "eva"}) == 1


def test_same_data_order_for_every_method_and_new_order_per_seed():
    a = batch_order(10, 7, 4, seed=3)
    assert a == batch_order(10, 7, 4, seed=3)
    assert a != batch_order(10, 7, 4, seed=4)
    # each epoch is a permutation: the first 10 indices drawn cover every example once
    flat = [i for step in a for i in step]
    assert sorted(flat[:10]) == list(range(10))


def test_t_quantile_matches_the_t_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 4, 9, 30):
        assert abs(t_quantile(0.975, df) - scipy_stats.t.ppf(0.975, df)) < 1e-4


def test_paired_difference_p_is_the_paired_t_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    ours = {0: 0.74, 1: 0.75, 2: 0.73, 3: 0.76, 4: 0.745, 5: 0.741}
    for shift in (0.0, 0.003, 0.01, 0.05):
        theirs = {s: v - shift + 0.004 * (-1) ** s * (s % 3) for s, v in ours.items()}
        d = paired_difference(ours, theirs, higher_is_better=True)
        expected = scipy_stats.ttest_rel(list(ours.values()), [theirs[s] for s in ours]).pvalue
        assert d["p"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        # the interval excludes zero exactly when p < 0.05
        assert (d["verdict"] != "tie") == (d["p"] < 0.05)
    assert paired_difference(ours, ours, True)["p"] == 1.0
    assert paired_difference(ours, {s: v - 0.01 for s, v in ours.items()}, True)["p"] == 0.0


def test_t_cdf_matches_the_t_distribution_on_both_sides():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (2, 9, 19):
        for x in (-6.0, -2.1, -0.3, 0.0, 0.7, 3.3, 8.0):
            assert stats.t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), abs=1e-7)


def test_holm_adjusts_step_down_and_keeps_the_order():
    # brute force from the definition: sort ascending, multiply the i-th smallest (0-based) by m - i,
    # take the running maximum, cap at 1
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}
    assert stats.holm(p) == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert stats.holm({"x": 0.3, "y": 0.6}) == pytest.approx({"x": 0.6, "y": 0.6})
    assert stats.holm({"only": 0.02}) == {"only": 0.02}
    assert stats.holm({}) == {}


def test_against_every_baseline_needs_the_seeds_and_corrects_per_row():
    runs = []
    for seed in range(12):
        noise = 0.002 * (-1) ** seed
        runs.append(_fake_run("default", seed, 1e-3, {0: 0.1, 20: 0.80}, 0.70 + noise))
        runs.append(_fake_run("lora_ga", seed, 1e-3, {0: 0.1, 20: 0.85}, 0.72 - noise))
        runs.append(_fake_run("cntlora-self", seed, 1e-3, {0: 0.1, 20: 0.84}, 0.73 + 0.001 * (seed % 3)))
    runs += [_fake_run("eva", seed, 1e-3, {0: 0.1, 20: 0.9}, 0.9) for seed in range(5)]  # too few seeds
    runs += [_fake_run("cntlora-cross", seed, 1e-3, {0: 0.1, 20: 0.9}, 0.9) for seed in range(5)]
    s = summarize({"task": "t", "metric": "accuracy", "higher_is_better": True, "steps": 20, "runs": runs})
    every = report.against_every_baseline(s)
    assert set(every) == {"cntlora-self"} and set(every["cntlora-self"]) == {"default", "lora_ga"}
    row = every["cntlora-self"]
    assert row["default"]["mean"] == pytest.approx(0.031, abs=1e-3) and row["default"]["seeds"] == 12
    assert row["default"]["p_holm"] == pytest.approx(min(1, 2 * min(r["p"] for r in row.values())))
    assert row["lora_ga"]["p_holm"] >= row["lora_ga"]["p"]
    table = report.format_every_baseline_table(s, every)
    assert table.startswith("### t against every PEFT init (") and "| cntlora-self | +0.0310 (12 seeds" in table
    assert "**win**" in table
    assert report.against_every_baseline(s, min_seeds=13) == {}


def test_paired_difference_verdicts():
    ours = {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.93, 4: 0.94}
    theirs = {s: v - 0.05 + 0.001 * s for s, v in ours.items()}
    assert paired_difference(ours, theirs, higher_is_better=True)["verdict"] == "win"
    assert paired_difference(theirs, ours, higher_is_better=True)["verdict"] == "loss"
    assert paired_difference(ours, theirs, higher_is_better=False)["verdict"] == "loss"
    noisy = {0: 0.9, 1: 0.8, 2: 0.95, 3: 0.85, 4: 0.9}
    assert paired_difference(noisy, {s: 0.88 for s in noisy}, True)["verdict"] == "tie"
    assert paired_difference({0: 1.0}, {0: 0.5}, True) is None  # one seed gives no interval


def _fake_run(label, seed, lr, val_curve, test):
    return {"label": label, "seed": seed, "lr": lr, "steps": 20, "init_seconds": 0.1, "trainable_params": 10,
            "train_loss": [1.0 - 0.01 * i for i in range(20)], "val": {str(k): v for k, v in val_curve.items()},
            "test": test}


def test_summarize_picks_lr_on_val_not_test_and_counts_steps_to_target():
    runs = []
    for seed in range(3):
        # lr 1e-3 has the better val, lr 1e-2 the better test: val must win
        runs.append(_fake_run("default", seed, 1e-3, {0: 0.1, 10: 0.5, 20: 0.8}, 0.70))
        runs.append(_fake_run("default", seed, 1e-2, {0: 0.1, 10: 0.4, 20: 0.6}, 0.95))
        runs.append(_fake_run("cntlora-cross", seed, 1e-3, {0: 0.1, 10: 0.85, 20: 0.86}, 0.80 + 0.01 * seed))
    s = summarize({"task": "t", "metric": "accuracy", "higher_is_better": True, "steps": 20, "runs": runs})
    assert s["methods"]["default"]["lr"] == 1e-3
    assert s["methods"]["default"]["test_mean"] == pytest.approx(0.70)
    assert s["methods"]["default"]["steps_to_target"] == 20
    assert s["methods"]["cntlora-cross"]["steps_to_target"] == 10
    assert s["methods"]["cntlora-cross"]["vs_default"]["verdict"] == "win"
    assert s["best_baseline"] == "default"


def test_fresh_seed_check_uses_only_the_fresh_seeds():
    runs = []
    for seed in range(10):
        # seeds 0-4: cntlora-cross far ahead; the fresh seeds 5-9: exactly as good as default, up to noise
        ahead = 0.2 if seed < 5 else 0.001 * (-1) ** seed
        runs.append(_fake_run("default", seed, 1e-3, {0: 0.1, 20: 0.8}, 0.70 + 0.01 * seed))
        runs.append(_fake_run("cntlora-cross", seed, 1e-3, {0: 0.1, 20: 0.8}, 0.70 + 0.01 * seed + ahead))
    runs += [_fake_run("eva", seed, 1e-3, {0: 0.1, 20: 0.7}, 0.6) for seed in range(5)]  # no fresh seeds
    s = summarize({"task": "t", "metric": "accuracy", "higher_is_better": True, "steps": 20, "runs": runs})
    assert s["methods"]["cntlora-cross"]["vs_default"]["verdict"] == "win"  # all ten seeds
    check = report.fresh_seed_check(s)
    assert set(check) == {"default", "cntlora-cross"}  # eva ran no fresh seed
    assert check["cntlora-cross"]["seeds"] == 5 and check["cntlora-cross"]["vs_default"]["verdict"] == "tie"
    assert check["cntlora-cross"]["test_mean"] == pytest.approx(0.77 + 0.001 * (-1 + 1 - 1 + 1 - 1) / 5)
    assert check["default"]["vs_default"] is None
    table = report.format_fresh_table(s, check)
    assert table.startswith("### t, fresh seeds 5-9 (") and "| cntlora-cross | " in table


def test_reference_labels_get_the_tasks_reference_set(one_thread):
    from cntlora import CNTLoRAConfig, initialize

    task = make_task("tiny")
    assert task.reference_batches

    def first_a(model):
        return next(v for k, v in model.state_dict().items() if "lora_A" in k).clone()

    with_reference, _ = protocol.init_model(task, "cntlora-cross@pretrain_source=reference", 0, torch.device("cpu"))
    with_weights, _ = protocol.init_model(task, "cntlora-cross", 0, torch.device("cpu"))
    assert not torch.allclose(first_a(with_reference), first_a(with_weights))
    # the same as the library called directly with the task's reference batches
    config = CNTLoRAConfig(mode="cross", r=4, alpha=4.0, pretrain_source="reference", seed=0)
    torch.manual_seed(0)
    direct = initialize(task.build_model(0), task.calibration_batches(), config, target_modules=task.target_modules,
                        reference_dataloader=list(task.reference_batches), progress=False)
    assert torch.equal(first_a(direct), first_a(with_reference))


def test_reference_label_without_a_reference_set_says_so():
    task = make_task("tiny")
    task.reference_batches = ()
    with pytest.raises(CNTLoRAError, match="has no reference set"):
        protocol.init_model(task, "cntlora-shift@pretrain_source=reference", 0, torch.device("cpu"))


def test_parse_label():
    assert parse_label("cntlora-cross@ridge=0.1,base=residual,strength=none") == (
        "cntlora-cross", {"ridge": 0.1, "base": "residual", "strength": None})
    assert parse_label("default") == ("default", {})
    with pytest.raises(CNTLoRAError, match="unknown method"):
        parse_label("cntlora-diagonal")
    with pytest.raises(CNTLoRAError, match="key=value"):
        parse_label("cntlora-cross@ridge")


def test_channel_linear_is_the_same_function_as_the_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 5, 1, bias=False), nn.ReLU(), nn.Conv2d(5, 4, 1))
    x = torch.randn(2, 6, 3, 3)
    before = net(x)
    targets = convs_to_linear(net, ["0", "2"])
    assert targets == ["0.linear", "2.linear"]
    assert isinstance(net[0], ChannelLinear)
    torch.testing.assert_close(net(x), before)
    # PEFT's SVD inits accept the wrapped layers and keep the output (PiSSA is residual)
    model = peft_init("pissa_niter_4", net, {"target_modules": targets, "r": 2, "lora_alpha": 2}, [])
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_summary_entry_keeps_only_canonical_method_names():
    runs = [_fake_run(label, seed, 1e-3, {0: 0.1, 10: 0.5, 20: 0.8}, 0.7)
            for label in ("default", "cntlora-cross@ridge=0.1") for seed in range(2)]
    s = summarize({"task": "t", "metric": "accuracy", "higher_is_better": True, "steps": 20, "runs": runs})
    assert set(s["methods"]) == {"default", "cntlora-cross@ridge=0.1"}
    assert set(report.summary_entry(s)["methods"]) == {"default"}


def test_rank_override_keeps_the_lora_scale():
    base = {"r": 8, "lora_alpha": 16, "target_modules": ["q"]}
    method, overrides, harness, lora = resolve_label("cntlora-cross-vas@r=4,calib=16", base)
    assert (method, overrides, harness) == ("cntlora-cross-vas", {"r": 4, "alpha": 8.0}, {"calib": 16})
    assert lora == base
    method, overrides, harness, lora = resolve_label("default@r=16", base)
    assert overrides == {} and lora["r"] == 16 and lora["lora_alpha"] / lora["r"] == 2.0


def test_plots_are_written(tmp_path):
    labels = ["default"] + [label for sweep in report.sensitivity_labels().values() for _, label in sweep]
    runs = [_fake_run(label, seed, 1e-3, {0: 0.1, 10: 0.5, 20: 0.8}, 0.7 + 0.01 * seed)
            for label in dict.fromkeys(labels) for seed in range(2)]
    s = summarize({"task": "t", "metric": "accuracy", "higher_is_better": True, "steps": 20, "runs": runs})
    s["task"] = "t-sensitivity"
    paths = report.plot_task(s, tmp_path) + [report.plot_sensitivity(s, tmp_path, reference=s["methods"]["default"])]
    assert paths[-1].name == "sensitivity-t.png"
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_sweeps_share_the_default_run():
    sweeps = report.sensitivity_labels()
    assert set(sweeps) == set(report.SENSITIVITY) | {"r-vas"}
    # the default value of every sweep is the plain method label, so the sweeps share one run
    assert dict(sweeps["ridge"])[CNTLoRAConfig.ridge] == "cntlora-self"
    assert dict(sweeps["calib"])[64] == dict(sweeps["r"])[8] == "cntlora-self"
    assert dict(sweeps["gamma"]) == {0.1: "cntlora-cross@gamma=0.1", 1.0: "cntlora-cross", 10.0: "cntlora-cross@gamma=10"}
    assert dict(sweeps["r-vas"])[4] == "cntlora-self-vas@r=4"
    for sweep in sweeps.values():
        for _, label in sweep:
            parse_label(label)


def _log(path, rows):
    with open(path, "a") as f:
        for kind, spec, data in rows:
            f.write(json.dumps({"kind": kind, "spec": spec, "data": data}) + "\n")


META = {"task": "t", "metric": "accuracy", "higher_is_better": True, "steps": 20, "train_size": 100}


def test_load_runs_folds_parts_into_their_table_and_keeps_the_latest_duplicate(tmp_path):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    _log(old, [("meta", "t", {**META, "task": "t"})]
         + [("run", "t", _fake_run("default", s, 1e-3, {0: 0.1, 20: 0.8}, 0.70)) for s in range(2)]
         + [("run", "t", _fake_run("default", 0, 1e-3, {0: 0.1, 20: 0.8}, 0.71))])  # a repeat within one log
    _log(new, [("meta", "t+a_row_norm", {**META, "task": "t+a_row_norm"})]
         + [("run", "t+a_row_norm", _fake_run("default", 1, 1e-3, {0: 0.1, 20: 0.8}, 0.90)),
            ("run", "t+a_row_norm", _fake_run("cntlora-self@a_row_norm=1", 0, 1e-3, {0: 0.1, 20: 0.8}, 0.80))])
    loaded = report.load_runs([old, new])
    assert list(loaded) == ["t"] and loaded["t"]["task"] == "t"
    tests = {(r["label"], r["seed"]): r["test"] for r in loaded["t"]["runs"]}
    assert tests == {("default", 0): 0.71, ("default", 1): 0.90, ("cntlora-self@a_row_norm=1", 0): 0.80}
    s = summarize(loaded["t"])
    assert s["methods"]["default"]["seeds"] == 2 and s["methods"]["default"]["test_mean"] == pytest.approx(0.805)
    # a part with other steps cannot share the table
    _log(new, [("meta", "t+longer", {**META, "steps": 40})])
    with pytest.raises(CNTLoRAError, match="differs"):
        report.load_runs([old, new])


@pytest.mark.parametrize("label", ["pissa_niter_4", "corda", "cntlora-self@base=residual"])
def test_shared_init_gives_the_runs_of_separate_inits(label, one_thread):
    # one init trained at two lrs (copies of the initialized model, base weights included)
    # must give exactly the runs that a fresh init per lr gives
    task = make_task("tiny")
    shared = protocol.train_lrs(task, label, 1, [1e-3, 3e-3], 8, checkpoints=(4,), device="cpu")
    for record in shared:
        alone = protocol.train_once(task, label, 1, record["lr"], 8, checkpoints=(4,), device="cpu")
        assert record["train_loss"] == alone["train_loss"]
        assert (record["val"], record["test"]) == (alone["val"], alone["test"])
    assert shared[0]["init_seconds"] == shared[1]["init_seconds"]  # the one init's time on every lr's record


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_corda_calibrated_on_the_cpu_gives_the_same_adapter_on_the_models_device(device, one_thread):
    import dataclasses

    task = make_task("tiny")
    here, _ = protocol.init_model(task, "corda", 0, torch.device(device))
    moved, _ = protocol.init_model(dataclasses.replace(task, corda_device="cpu"), "corda", 0, torch.device(device))
    a, b = here.state_dict(), moved.state_dict()
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert b[k].device.type == device
        # a GPU's eigh may flip an eigenvector's sign, which flips a row of A and a column of B together
        if "lora_A" in k or "lora_B" in k:
            torch.testing.assert_close(b[k].abs(), a[k].abs(), rtol=1e-3, atol=1e-4)
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_run_quality_inits_once_per_seed_and_keeps_the_lr_protocol(one_thread):
    task = make_task("tiny")
    lrs = [1e-3, 1e-2]
    results = protocol.run_quality(task, ["default"], seeds=[0, 1, 2], lrs=lrs, steps=3, checkpoints=(1,),
                                  device="cpu", select_seeds=1, log=None)
    runs = results["runs"]
    seed0 = [r for r in runs if r["seed"] == 0]
    assert sorted(r["lr"] for r in seed0) == lrs and len({r["init_seconds"] for r in seed0}) == 1
    best = protocol.choose_lr(seed0, task.higher_is_better)
    assert sorted((r["seed"], r["lr"]) for r in runs if r["seed"] > 0) == [(1, best), (2, best)]


def test_run_many_resumes_a_cut_run_to_the_same_runs():
    from bench.quality.pool import Spec, run_many

    spec = Spec(name="t", task="tiny", methods=["default", "cntlora-self"], seeds=[0, 1, 2], lrs=[1e-3, 1e-2],
                steps=3, task_kwargs={"quick": True}, checkpoints=(2,), select_seeds=1)
    whole = run_many([spec], workers=1, device="cpu", log=None)["t"]["runs"]
    key = lambda r: (r["label"], r["seed"], r["lr"])  # noqa: E731
    assert len(whole) == 2 * (2 + 2)  # 2 lrs on seed 0, then seeds 1-2 at the chosen lr
    # cut after seed 0 of one label; cut after every lr choice and one extra seed
    for kept in (sorted(whole, key=key)[:2], whole[:5]):
        new = []
        again = run_many([spec], workers=1, device="cpu", log=None, done={"t": kept},
                         on_run=lambda name, r: new.append(r))["t"]["runs"]
        assert sorted(map(key, new)) == sorted(set(map(key, whole)) - set(map(key, kept)))  # only what was missing
        assert {key(r): r["test"] for r in again} == pytest.approx({key(r): r["test"] for r in whole})


def test_run_many_extends_one_labels_grid_and_runs_only_the_new_lr_and_its_seeds():
    from bench.quality.pool import Spec, run_many

    spec = Spec(name="t", task="tiny", methods=["default", "cntlora-self"], seeds=[0, 1, 2], lrs=[1e-3, 1e-2],
                steps=3, task_kwargs={"quick": True}, checkpoints=(2,), select_seeds=1)
    whole = run_many([spec], workers=1, device="cpu", log=None)["t"]["runs"]
    spec.label_lrs = {"default": [1e-3, 1e-2, 1.0]}  # an lr far past the edge: it runs on seed 0 only, and loses
    new = []
    again = run_many([spec], workers=1, device="cpu", log=None, done={"t": whole},
                     on_run=lambda name, r: new.append(r))["t"]["runs"]
    assert [(r["label"], r["seed"], r["lr"]) for r in new] == [("default", 0, 1.0)]
    assert len(again) == len(whole) + 1
    # an lr that wins on seed 0 gets the other seeds
    spec.label_lrs = {"cntlora-self": [1e-3, 1e-2, 3e-2]}
    new = []
    run_many([spec], workers=1, device="cpu", log=None, done={"t": again}, on_run=lambda name, r: new.append(r))
    seed0 = [r for r in again + new if r["label"] == "cntlora-self" and r["seed"] == 0]
    best = protocol.choose_lr(seed0, make_task("tiny").higher_is_better)
    expected = [("cntlora-self", 0, 3e-2)] + ([("cntlora-self", s, 3e-2) for s in (1, 2)] if best == 3e-2 else [])
    assert sorted((r["label"], r["seed"], r["lr"]) for r in new) == sorted(expected)


def test_load_runs_reads_an_xz_log_as_the_plain_one(tmp_path):
    import lzma

    rows = [{"kind": "meta", "spec": "t", "data": {"metric": "accuracy", "higher_is_better": True, "steps": 1}},
            {"kind": "run", "spec": "t", "data": {"label": "default", "seed": 0, "lr": 0.1, "test": 0.5}}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "runs.jsonl").write_text(text)
    with lzma.open(tmp_path / "runs.jsonl.xz", "wt") as f:
        f.write(text)
    assert report.load_runs([tmp_path / "runs.jsonl.xz"]) == report.load_runs([tmp_path / "runs.jsonl"])
