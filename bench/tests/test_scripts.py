"""The quality benchmark's scripts (bench/quality/): the run plan, the report, splitting data for transfer."""

import json
import os

import pytest
import torch

from bench.quality import export_data, plan, run_all, split_for_transfer, write_tables
from bench.quality.pool import Spec
from bench.quality.task import parse_label


def test_only_runs_groups_in_the_order_given():
    specs = plan.plan("full", 5, 100)
    names = [s.name for s in plan.select(specs, ["a_row_norm", "lm-fewshot", "text", "vision", "sensitivity"])]
    assert names[:5] == ["text-fewshot+a_row_norm", "vision-fewshot+a_row_norm", "lm-fewshot", "text", "vision"]
    assert all("-sensitivity+" in n for n in names[5:]) and len(names) == 11
    assert [s.name for s in plan.select(specs, ["vision", "text"])] == ["vision", "text"]
    with pytest.raises(SystemExit, match="no spec or group"):
        plan.select(specs, ["nothing"])


def test_a_row_norm_sweep_jobs():
    (spec,) = plan.select(plan.plan("full", 5, 100), ["text-fewshot+a_row_norm"])
    n = len(plan.A_ROW_NORM)
    assert spec.methods == plan.A_ROW_NORM and spec.lrs == plan.LRS and spec.select_seeds == 1
    jobs, runs, _ = run_all.estimate(spec)
    # per label: seed 0 is one job trained at 3 lrs, seeds 1-4 one job at the chosen lr each
    assert (jobs, runs) == (n * 5, n * (3 + 4))


def test_sensitivity_takes_the_lr_each_method_chose_in_the_headline_table(tmp_path):
    log = tmp_path / "runs.jsonl"
    rows = [{"kind": "meta", "spec": "text-fewshot", "data": {"task": "text-fewshot", "metric": "accuracy",
                                                               "higher_is_better": True, "steps": 100, "train_size": 100}}]
    for lr, val in zip(plan.LRS, (0.5, 0.9, 0.7)):
        rows.append({"kind": "run", "spec": "text-fewshot", "data": {
            "label": "cntlora-self", "seed": 0, "lr": lr, "steps": 100, "val": {"100": val}, "test": 0.0}})
    # cntlora-cross's search was cut short: it must not fix an lr
    rows.append({"kind": "run", "spec": "text-fewshot", "data": {
        "label": "cntlora-cross", "seed": 0, "lr": 1e-3, "steps": 100, "val": {"100": 0.9}, "test": 0.0}})
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = plan.chosen_lrs(plan.read_logs([log]))
    specs = {s.name: s for s in plan.select(plan.plan("full", 5, 100, chosen), ["sensitivity"])}
    self_spec = specs["text-fewshot-sensitivity+cntlora-self"]
    assert self_spec.lrs == [1e-3] and self_spec.select_seeds is None and self_spec.seeds == [0, 1, 2]
    assert "cntlora-self" in self_spec.methods and "cntlora-self@ridge=0.01" not in self_spec.methods
    cross = specs["text-fewshot-sensitivity+cntlora-cross"]
    assert cross.lrs == plan.LRS and cross.select_seeds == 1
    assert specs["vision-fewshot-sensitivity+cntlora-self"].lrs == plan.LRS  # nothing logged for vision
    # every label of the study runs exactly once per task
    labels = [l for s in specs.values() if s.task == "text-fewshot" for l in s.methods]
    assert len(labels) == len(set(labels)) == 14


def test_dry_run_prints_jobs_and_runs_nothing(capsys):
    assert run_all.main(["--plan", "full", "--only", "a_row_norm", "--dry-run", "--workers", "15", "--lr-from"]) == 0
    out = capsys.readouterr().out
    n = len(plan.A_ROW_NORM) * 2  # labels on the two few-shot tasks, 5 seeds, 3 lrs on seed 0
    assert f"total: {n * 5} jobs, {n * 7} training runs" in out and "on 15 workers" in out


def _write_log(path, runs, steps=None):
    """A runs.jsonl as run_all writes it: runs = [(spec, label, seed, lr, final val)]; steps: {table: steps} (100)."""

    def steps_of(spec):
        return (steps or {}).get(spec.partition("+")[0], 100)

    rows = [{"kind": "meta", "spec": spec, "data": {"task": spec, "metric": "accuracy", "higher_is_better": True,
                                                    "steps": steps_of(spec), "train_size": 100}}
            for spec in dict.fromkeys(spec for spec, *_ in runs)]
    rows += [{"kind": "run", "spec": spec, "data": {"label": label, "seed": seed, "lr": lr, "steps": steps_of(spec),
                                                    "val": {str(steps_of(spec)): val}, "test": 0.0}}
             for spec, label, seed, lr, val in runs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _grid(spec, label, vals):
    """Seed 0 of `label` at each lr of LRS with these final val metrics."""
    return [(spec, label, 0, lr, val) for lr, val in zip(plan.LRS, vals)]


def test_lr_past_the_grid_is_half_a_decade_on_the_1_3_10_series():
    assert plan.beyond(3e-3, up=True) == 1e-2 and plan.beyond(3e-4, up=False) == 1e-4
    assert plan.beyond(1e-3, up=True) == 3e-3 and plan.beyond(1e-2, up=True) == 3e-2


def test_edges_and_edges_seeds(tmp_path, capsys):
    runs = (_grid("text", "cntlora-self", (0.5, 0.7, 0.9))  # chose the top: runs at 1e-2
            + _grid("text", "default", (0.5, 0.9, 0.7))  # interior: nothing
            # chose the bottom, its 1e-4 run is logged and lost: nothing, in either group
            + _grid("text", "pissa_niter_4", (0.9, 0.7, 0.5)) + [("text+edges", "pissa_niter_4", 0, 1e-4, 0.8)]
            # chose the top, its 1e-2 run is logged and won, seed 2 ran there too: edges-seeds runs 1, 3, 4
            + _grid("text", "olora", (0.5, 0.7, 0.9)) + [("text+edges", "olora", s, 1e-2, 0.95) for s in (0, 2)]
            + [("text", "gaussian", 0, 3e-3, 0.9)]  # a search cut short fixes no edge
            + _grid("text-fewshot-sensitivity+cntlora-self", "cntlora-self", (0.5, 0.7, 0.9)))  # not a headline table
    tables = plan.read_logs([_write_log(tmp_path / "runs.jsonl", runs)])
    assert plan.edge_specs(tables) == [Spec("text+edges", "text", ["cntlora-self"], [0], [1e-2], 100)]
    assert plan.edge_seed_specs(tables, 5) == [Spec("text+edges", "text", ["olora"], [1, 3, 4], [1e-2], 100)]
    assert "text olora chose 0.01, again at the edge" in capsys.readouterr().out

    # the edges run's log: cntlora-self wins at 1e-2, is not extended again and gets seeds 1-4 there
    edges_log = _write_log(tmp_path / "edges.jsonl", [("text+edges", "cntlora-self", 0, 1e-2, 0.95)])
    tables = plan.read_logs([tmp_path / "runs.jsonl", edges_log])
    assert plan.edge_specs(tables) == []
    assert plan.edge_seed_specs(tables, 5) == [Spec("text+edges", "text", ["cntlora-self"], [1, 2, 3, 4], [1e-2], 100),
                                                  Spec("text+edges", "text", ["olora"], [1, 3, 4], [1e-2], 100)]
    assert run_all.main(["--dry-run", "--only", "edges", "edges-seeds", "--lr-from", str(tmp_path / "runs.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "lr 0.01, seeds [0]: cntlora-self" in out and "lr 0.01, seeds [1, 3, 4]: olora" in out
    assert "total: 4 jobs, 4 training runs" in out


def test_missing_seeds(tmp_path, capsys):
    steps = {"lm-fewshot": 50}
    runs = (_grid("lm-fewshot", "default", (0.5, 0.9, 0.7)) + [("lm-fewshot", "default", s, 1e-3, 0.9) for s in (1, 2)]
            # chose 3e-4, the edge, and its 1e-4 run lost: seeds 1-4 at 3e-4
            + _grid("lm-fewshot", "eva", (0.9, 0.7, 0.5)) + [("lm-fewshot+edges", "eva", 0, 1e-4, 0.8)]
            + _grid("lm-fewshot", "olora", (0.9, 0.7, 0.5))  # at the edge, not checked yet: waits for edges
            # chose 1e-4, past the grid: edges-seeds runs its seeds
            + _grid("lm-fewshot", "corda", (0.9, 0.7, 0.5)) + [("lm-fewshot+edges", "corda", 0, 1e-4, 0.95)]
            + _grid("lm", "default", (0.5, 0.9, 0.7)))  # another table: not this group's
    tables = plan.read_logs([_write_log(tmp_path / "runs.jsonl", runs, steps)])
    assert plan.missing_specs("lm-fewshot", tables, range(5)) == [
        Spec("lm-fewshot+missing", "lm-fewshot", ["default"], [3, 4], [1e-3], 50),
        Spec("lm-fewshot+missing", "lm-fewshot", ["eva"], [1, 2, 3, 4], [3e-4], 50)]
    out = capsys.readouterr().out
    assert "lm-fewshot gaussian has no lr search logged" in out
    assert "lm-fewshot olora chose 0.0003, the edge of the grid; run the edges group first" in out
    assert plan.missing_specs("lm", tables, range(5)) == [Spec("lm+missing", "lm", ["default"], [1, 2, 3, 4], [1e-3], 100)]
    for group in ("lm-fewshot-missing", "lm-missing"):  # no logs: nothing to run
        assert run_all.main(["--dry-run", "--only", group, "--lr-from"]) == 0
        assert "nothing to run" in capsys.readouterr().out


def test_confirm2_runs_the_fixed_labels_on_seeds_10_to_19_and_fills_5_to_9(tmp_path):
    runs = []
    for table in ("vision-fewshot", "text-fewshot"):
        for label in plan.CONFIRM2[table]:
            runs += _grid(table, label, (0.5, 0.9, 0.7))  # each chose 1e-3
            done = range(1, 10) if label not in ("eva", "corda") or table == "vision-fewshot" else range(1, 5)
            runs += [(f"{table}+confirm", label, s, 1e-3, 0.9) for s in done]
    runs.append(("vision-fewshot+confirm2", "default", 10, 1e-3, 0.9))  # already logged: not run again
    tables = plan.read_logs([_write_log(tmp_path / "runs.jsonl", runs)])
    specs = run_all.main(["--dry-run", "--only", "confirm2", "--lr-from", str(tmp_path / "runs.jsonl")])
    assert specs == 0
    built = [s for t, labels in plan.CONFIRM2.items()
             for s in plan.missing_specs(t, tables, plan.CONFIRM2_SEEDS[t], labels, "confirm2", check_edges=False)]
    seeds = {(s.task, m): list(s.seeds) for s in built for m in s.methods}
    assert seeds[("vision-fewshot", "default")] == list(range(11, 20))
    assert seeds[("vision-fewshot", "cntlora-self-vas@a_row_norm=1")] == list(range(10, 20))
    assert seeds[("text-fewshot", "eva")] == list(range(5, 20)) and seeds[("text-fewshot", "lora_ga")] == list(range(10, 20))
    assert set(seeds) == {(t, m) for t, labels in plan.CONFIRM2.items() for m in labels}
    assert all(s.lrs == [1e-3] and s.select_seeds is None for s in built)


def test_candidate_group_searches_one_step_up_on_seed_0():
    specs = plan.select(plan.plan("full", 5, 100), ["candidate"])
    assert {s.task: s.methods for s in specs} == plan.CANDIDATE
    for s in specs:
        assert s.lrs == [*plan.LRS, 1e-2] and s.select_seeds == 1 and list(s.seeds) == list(range(5))
        assert s.steps == (50 if s.task == "lm-fewshot" else 100)


def test_reference_group_covers_every_table_and_searches_the_starts_own_grid():
    specs = plan.select(plan.plan("full", 5, 100), ["reference"])
    by_table = {}
    for s in specs:
        by_table.setdefault(s.task, []).extend(s.methods)
        assert s.select_seeds == 1 and list(s.seeds) == list(range(5))
        for label in s.methods:
            assert parse_label(label)[1]["pretrain_source"] == "reference"
            assert s.lrs == plan.explore_lrs(label)
            assert s.lrs[0] < plan.LRS[0] if "base=residual" in label else s.lrs[-1] > plan.LRS[-1]
    assert {t: sorted(m) for t, m in by_table.items()} == {t: sorted(m) for t, m in plan.REFERENCE.items()}
    assert len({s.name for s in specs}) == len(specs)  # run_many counts an lr search's runs by name


def test_reference_confirm_runs_seeds_5_to_19_of_its_labels(tmp_path):
    runs = []
    for table, labels in plan.REFERENCE_CONFIRM.items():
        for label in labels:
            runs += _grid(table, label, (0.5, 0.9, 0.7)) + [(table, label, s, 1e-3, 0.9) for s in range(1, 5)]
            if not label.startswith("cntlora-"):  # the PEFT inits already ran the fifth session's seeds
                runs += [(f"{table}+confirm", label, s, 1e-3, 0.9) for s in range(5, 10)]
    tables = plan.read_logs([_write_log(tmp_path / "runs.jsonl", runs)])
    built = [s for t, labels in plan.REFERENCE_CONFIRM.items()
             for s in plan.missing_specs(t, tables, range(5, 20), labels, "reference-confirm", check_edges=False)]
    seeds = {(s.task, m): list(s.seeds) for s in built for m in s.methods}
    assert seeds[("text", "eva")] == list(range(10, 20))
    assert seeds[("vision", "cntlora-cross-vas@pretrain_source=reference")] == list(range(5, 20))
    assert set(seeds) == {(t, m) for t, labels in plan.REFERENCE_CONFIRM.items() for m in labels}
    assert run_all.main(["--dry-run", "--only", "reference-confirm", "--lr-from", str(tmp_path / "runs.jsonl")]) == 0


def test_variants_group_searches_the_lr_on_seed_0():
    specs = plan.select(plan.plan("full", 5, 100), ["variants"])
    assert {s.task: s.methods for s in specs} == plan.VARIANTS_GPU
    assert all(s.lrs == plan.LRS and s.select_seeds == 1 and list(s.seeds) == [0, 1, 2, 3, 4] for s in specs)
    for s in specs:  # every label parses, so no worker fails on it
        for label in s.methods:
            parse_label(label)


def test_labels_keep_one_label_of_the_chosen_specs(capsys):
    assert run_all.main(["--dry-run", "--only", "variants", "--labels", plan.RESIDUAL_VAS, "--lr-from"]) == 0
    out = capsys.readouterr().out
    assert "lm+variants" in out and "lm-fewshot+variants" in out and "vision+variants" not in out
    assert "total: 10 jobs, 14 training runs" in out  # 2 tables, 5 seeds, 3 lrs on seed 0


def test_report_replaces_the_tables_of_the_same_task_in_the_docs():
    doc = "\n".join(["# Results", "", "### lm (perplexity, lower is better, 100 steps, 800 train examples)", "",
                     "| method | lr |", "|---|---|", "| old | 1 |", "", "Text after the table.",
                     "### lm-fewshot (perplexity, lower is better, 50 steps, 100 train examples)", "", "| keep | 2 |"])
    new = "### lm (perplexity, lower is better, 100 steps, 800 train examples)\n\n| method | lr |\n|---|---|\n| new | 3 |"
    unknown = "### vision (accuracy, higher is better, 100 steps, 800 train examples)\n\n| x |"
    text, replaced = write_tables.replace_tables(doc, [new, unknown])
    assert replaced == ["lm"]
    assert "| new | 3 |" in text and "| old | 1 |" not in text and "| keep | 2 |" in text
    assert "Text after the table." in text and text.count("### lm (") == 1 and "### vision" not in text


def _reassemble(parts, joined):
    """What the GPU machine does with the parts: copy each one's files into one folder."""
    for part, _ in parts:
        for f in part.rglob("*"):
            if f.is_file():
                (joined / f.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
                (joined / f.relative_to(part)).write_bytes(f.read_bytes())
    return joined


def test_split_for_transfer_parts_fit_and_reassemble(tmp_path):
    src = tmp_path / "export"
    sizes = {"a.bin": 700, "m/b.bin": 600, "m/c.bin": 300, "d.json": 200, "m/e.txt": 100}
    for name, size in sizes.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(size))
    (tmp_path / "export_7").mkdir()  # not ours (no manifest): must survive
    parts = split_for_transfer.split(src, 1000, "export_")
    assert all(size <= 1000 for _, size in parts) and len(parts) == 2
    joined = _reassemble(parts, tmp_path / "joined")
    assert split_for_transfer.check(joined) == []
    for name in sizes:
        assert (joined / name).read_bytes() == (src / name).read_bytes()
    (joined / "m/c.bin").unlink()
    assert split_for_transfer.check(joined) == ["m/c.bin"]
    # a second split replaces the parts of the first, and a file larger than a part is refused
    assert len(split_for_transfer.split(src, 2000, "export_")) == 1
    assert not (tmp_path / "export_1").exists() and (tmp_path / "export_7").exists()
    with pytest.raises(SystemExit, match="a.bin"):
        split_for_transfer.split(src, 650, "export_")


@pytest.mark.slow  # needs the packaged SmolLM2 (a 20 s dequantization on first use) and writes 270 MB
def test_lm_task_reads_the_exported_smollm2(tmp_path, monkeypatch):
    from bench.quality.tasks import make_task

    export_data.main([str(tmp_path / "data"), "--only", "lm"])
    parts = split_for_transfer.split(tmp_path / "data", 60 * 2**20, "part_")
    assert all(size <= 60 * 2**20 for _, size in parts)
    shards = list((tmp_path / "data" / "smollm2").glob("*.safetensors"))
    assert len(shards) > 1 and max(f.stat().st_size for f in shards) <= 60 * 2**20
    joined = _reassemble(parts, tmp_path / "joined")
    assert split_for_transfer.check(joined) == []
    monkeypatch.delenv("CNTLORA_BENCH_DATA", raising=False)
    packaged = make_task("lm-fewshot", quick=True)
    monkeypatch.setenv("CNTLORA_BENCH_DATA", str(joined))
    exported = make_task("lm-fewshot", quick=True)
    assert all(torch.equal(a, b) for a, b in zip(packaged.train + packaged.test, exported.train + exported.test))
    a, b = packaged.build_model(0), exported.build_model(0)
    assert next(b.parameters()).dtype == torch.float32
    batch = packaged.collate(packaged.val[:2])
    with torch.no_grad():
        la, lb = (m(input_ids=batch["input_ids"]).logits for m in (a, b))
    assert (la - lb).abs().max() < 0.02 * la.abs().max()  # fp16 rounding of the weights only


def test_tables_keeps_only_the_named_tables(tmp_path, capsys):
    runs = _grid("text", "cntlora-self", (0.5, 0.7, 0.9)) + _grid("vision", "default", (0.9, 0.7, 0.5))
    log = str(_write_log(tmp_path / "runs.jsonl", runs))
    assert run_all.main(["--dry-run", "--only", "edges", "--lr-from", log]) == 0
    both = capsys.readouterr().out
    assert "text+edges" in both and "vision+edges" in both
    assert run_all.main(["--dry-run", "--only", "edges", "--tables", "vision", "--lr-from", log]) == 0
    only = capsys.readouterr().out
    assert "vision+edges" in only and "text+edges" not in only and "total: 1 jobs" in only
