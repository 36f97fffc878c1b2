"""Countdown: reach a target with + − × over given numbers; many valid answers per problem.

task.py (vocabulary, enumeration, reward, problems, trainer adapter), target.py (the exact
target distribution), sft.py (fitting π_ref), runs.py (the list of runs), evaluate.py
(held-out metrics), runner.py (the experiment), report.py (summary.json, report.md, plots).
"""
