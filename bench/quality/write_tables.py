"""Turn run logs (runs.jsonl from run_all) into summary.json, per-task JSON, plots and tables.

    python -m bench.quality.write_tables LOG.jsonl [LOG2.jsonl ...] --out bench/results [--docs docs/benchmarks.md]

Give the logs oldest first: a run logged twice (same table, label, seed, lr) counts once, the
latest line wins (bench.quality.report.load_runs). A spec named TABLE+PART (e.g.
'text-fewshot+a_row_norm') adds its runs to TABLE's table. Headline tables (no '-' suffix other
than '-fewshot') go into summary.json; '*-sensitivity' tables get sensitivity-<task>.png;
'*-smoke' specs are checked for finite numbers only. --docs replaces, in that markdown file,
each table whose '### TASK (' heading a new table has, so the docs show the logged numbers.
Tables where the confirm group ran seeds 5-9 (confirm2: 10-19) also get '### TASK, fresh seeds 5-9 ('
tables: the paired differences on those seeds alone, which ran after the settings they check were
chosen; and '### TASK against every PEFT init (' tables: each CNTLoRA setting with 10 seeds or more
against each PEFT init with as many, with Holm's correction over the PEFT inits.
"""

import argparse
import math
import sys
from pathlib import Path

from cntlora.files import atomic_write, write_json

from .protocol import FRESH_SEEDS, SECOND_FRESH_SEEDS
from .report import (RESULTS_JSON, against_every_baseline, format_every_baseline_table, format_fresh_table,
                     format_table, fresh_seed_check, load_runs, plot_sensitivity, plot_task, summarize, summary_entry,
                     update_summary)


def main(argv=None) -> int:
    """Write the files and tables of the logs named on the command line (see the module's docstring).

    Returns:
        0.

    Raises:
        CNTLoRAError: the logs' specs of one table disagree (report.load_runs).
    """
    p = argparse.ArgumentParser(prog="python -m bench.quality.write_tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--docs", default=None, help="a markdown file whose tables of the same tasks are replaced")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(a.logs)
    summaries = {name: summarize(results) for name, results in loaded.items()}
    tables = []
    for name, results in loaded.items():
        summary = summaries[name]
        bad = [r["label"] for r in results["runs"]
               if not all(math.isfinite(v) for v in r["train_loss"] + [r["test"]] + list(r["val"].values()))]
        if name.endswith("-smoke"):
            print(f"{name}: {len(results['runs'])} runs, non-finite: {bad or 'none'}")
            continue
        # the raw runs stay in the log; this file holds the statistics drawn from them
        write_json(out / f"quality-{name}.json", {"runs_log": [Path(p).name for p in a.logs], "summary": summary},
                   **RESULTS_JSON)
        if name.endswith("-sensitivity"):
            # the PEFT-default line comes from the task's headline table (the study itself runs CNTLoRA only)
            headline = summaries.get(name.removesuffix("-sensitivity"), {"methods": {}})
            plot_sensitivity(summary, out, reference=headline["methods"].get("default"))
        else:
            update_summary(out / "summary.json", name, summary_entry(summary))
            plot_task(summary, out)
        tables.append(format_table(summary) + (f"\n\nnon-finite runs: {bad}" if bad else ""))
        for seeds, suffix in ((FRESH_SEEDS, ""), (SECOND_FRESH_SEEDS, "-10-19")):
            check = fresh_seed_check(summary, seeds)
            if len(check) > 1:  # a confirm group ran here: its differences on those fresh seeds alone
                write_json(out / f"quality-{name}-fresh-seeds{suffix}.json", check, **RESULTS_JSON)
                tables.append(format_fresh_table(summary, check, seeds))
        every = against_every_baseline(summary)
        if every:
            write_json(out / f"quality-{name}-every-baseline.json", every, **RESULTS_JSON)
            tables.append(format_every_baseline_table(summary, every))
    atomic_write(out / "quality-tables.md", lambda tmp: Path(tmp).write_text("\n\n".join(tables) + "\n"))
    print("\n\n".join(tables))
    if a.docs:
        doc = Path(a.docs)
        text, replaced = replace_tables(doc.read_text(), tables)
        atomic_write(doc, lambda tmp: Path(tmp).write_text(text))
        print(f"{a.docs}: replaced the tables of {', '.join(replaced) or 'no task'}")
    return 0


def replace_tables(doc: str, tables: list) -> tuple:
    """(doc with each table of `tables` put in place of the one under the same '### TASK (' heading, tasks
    replaced). A table is its heading line, one blank line and the '|' lines after it."""
    lines = doc.split("\n")
    replaced = []
    for table in tables:
        heading = table.split("\n", 1)[0]
        key = heading.split(" (", 1)[0] + " ("
        at = [i for i, line in enumerate(lines) if line.startswith(key)]
        if len(at) != 1:
            continue  # absent, or ambiguous: left alone
        end = at[0] + 1
        while end < len(lines) and lines[end] == "":
            end += 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[at[0]:end] = table.split("\n")
        replaced.append(heading[4:].split(" (", 1)[0])
    return "\n".join(lines), replaced


if __name__ == "__main__":
    sys.exit(main())
