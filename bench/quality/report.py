"""Turn run logs (runs.jsonl from run_all.py) into summary.json, per-task JSON, plots and tables.

    python bench/quality/report.py LOG.jsonl [LOG2.jsonl ...] --out bench/results

Headline specs (no '-' suffix other than '-fewshot') go into summary.json; '*-sensitivity'
specs get sensitivity-<task>.png; '*-smoke' specs are checked for finite numbers only.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from cntlora.bench.quality import (format_table, plot_sensitivity, plot_task, summarize, summary_entry,
                                   update_summary, write_json)


def load(paths):
    specs = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            spec = specs.setdefault(row["spec"], {"meta": None, "runs": []})
            if row["kind"] == "meta":
                spec["meta"] = row["data"]
            else:
                spec["runs"].append(row["data"])
    out = {}
    for name, spec in specs.items():
        if spec["meta"] is None or not spec["runs"]:
            continue
        out[name] = {**spec["meta"], "runs": spec["runs"]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    out = Path(a.out)
    tables = []
    for name, results in load(a.logs).items():
        summary = summarize(results)
        bad = [r["label"] for r in results["runs"]
               if not all(math.isfinite(v) for v in r["train_loss"] + [r["test"]] + list(r["val"].values()))]
        if name.endswith("-smoke"):
            print(f"{name}: {len(results['runs'])} runs, non-finite: {bad or 'none'}")
            continue
        # the raw runs stay in the log; this file holds the statistics drawn from them
        write_json(out / f"quality-{name}.json", {"runs_log": [Path(p).name for p in a.logs], "summary": summary})
        if name.endswith("-sensitivity"):
            plot_sensitivity(summary, out)
        else:
            update_summary(out / "summary.json", name, summary_entry(summary))
            plot_task(summary, out)
        tables.append(format_table(summary) + (f"\n\nnon-finite runs: {bad}" if bad else ""))
    (out / "quality-tables.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    sys.exit(main())
