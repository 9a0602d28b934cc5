"""Turn run logs (runs.jsonl from run_all.py) into summary.json, per-task JSON, plots and tables.

    python bench/quality/report.py LOG.jsonl [LOG2.jsonl ...] --out bench/results

Give the logs oldest first: a run logged twice (same table, label, seed, lr) counts once, the
latest line wins (cntlora.bench.quality.load_runs). A spec named TABLE+PART (e.g.
'text-fewshot+a_row_norm') adds its runs to TABLE's table. Headline tables (no '-' suffix other
than '-fewshot') go into summary.json; '*-sensitivity' tables get sensitivity-<task>.png;
'*-smoke' specs are checked for finite numbers only.
"""

import argparse
import math
import sys
from pathlib import Path

from cntlora.bench.quality import (format_table, load_runs, plot_sensitivity, plot_task, summarize, summary_entry,
                                   update_summary, write_json)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="bench/results")
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
        write_json(out / f"quality-{name}.json", {"runs_log": [Path(p).name for p in a.logs], "summary": summary})
        if name.endswith("-sensitivity"):
            # the PEFT-default line comes from the task's headline table (the study itself runs CNTLoRA only)
            headline = summaries.get(name.removesuffix("-sensitivity"), {"methods": {}})
            plot_sensitivity(summary, out, reference=headline["methods"].get("default"))
        else:
            update_summary(out / "summary.json", name, summary_entry(summary))
            plot_task(summary, out)
        tables.append(format_table(summary) + (f"\n\nnon-finite runs: {bad}" if bad else ""))
    (out / "quality-tables.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    sys.exit(main())
