"""`lemur experiment NAME`: the papers' tables run end to end (synthetic data, variants x seeds, a report).

tables.py   the tables as data (variants, stages, baselines, the papers' numbers)
sizes.py    small (2-core CPU) and large (one GPU) run shapes
dataset.py  the cached synthetic dataset
runner.py   planning and executing the training subprocesses, resume
report.py   aggregation over seeds, paired deltas and noise marks, table.md and results.json
chart.py    chart.png (Pillow)
machine.py  the hardware line
main.py     the command
"""
