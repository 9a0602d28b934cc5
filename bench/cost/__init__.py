"""Cost benchmark: wall time and peak memory of CNTLoRA's initialization against PEFT's inits.

inits.py builds the model and data and runs each init; measure.py times them (the `benchmark`
call); report.py gathers result files into a summary, tables and a plot; command.py is the
command line (`python -m bench.cost`, or `cntlora bench cost`).
"""
