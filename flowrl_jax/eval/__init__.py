"""Evaluation: sample n responses per benchmark problem, score them, summarise.

* ``runner``    the generation + scoring loop with resume, and ``summary.json`` / Markdown
* ``metrics``   Avg@n, unbiased pass@k, per-benchmark summaries, Markdown tables
* ``diversity`` judge-free diversity metrics over a problem's n responses
* ``judge``     the optional LLM judge of solution diversity
* ``report``    side-by-side comparison of runs (Markdown + PNG plots)
"""
