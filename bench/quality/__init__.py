"""Quality benchmark: fine-tune from every init under one protocol and compare the metrics.

Library first: describe a `Task` (task.py; the packaged ones are in tasks.py), train it with
protocol.run_quality (or pool.run_many over worker processes), then report.summarize the
results. The protocol (docs/benchmarks.md): every method gets the same model, LoRA budget,
calibration batches, data order per seed, optimizer and steps; each method's learning rate is
picked on the validation split (never test); test metrics are reported at that rate over the
seeds, with paired differences between methods (stats.py).

Scripts (run from the repository root): `python -m bench.quality` (one task, the same as
`cntlora bench quality`), `python -m bench.quality.run_all` (the plan, logged run by run) and
`python -m bench.quality.write_tables` (the logs -> summary.json, plots and tables).
"""
