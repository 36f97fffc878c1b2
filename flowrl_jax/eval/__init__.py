"""Evaluation: sample n responses per benchmark problem, score them, summarise, compare runs.

* ``runner``          evaluate_model (the `flowrl-jax eval` library entry) and run_eval
* ``records``         Problem, Generation, the Backend protocol, EvalError, sample keys
* ``suites``          the known benchmarks and suites; --suite / --diversity parsing
* ``engine_backend``  the JAX sampling engine behind the Backend protocol
* ``generate``        the generation + scoring loop that appends ``samples.jsonl``
* ``scoring``         reward scoring off the generation thread
* ``resume``          the resumable output files and per-chunk seeds
* ``summary``         ``summary.json``, ``results.md`` and ``<bench>.md``
* ``metrics``         Avg@n, unbiased pass@k, per-benchmark summaries, Markdown tables
* ``codeforces``      Codeforces pass rates and rating estimates
* ``diversity``       judge-free diversity metrics over a problem's n responses
* ``judge``           the optional LLM judge of solution diversity
* ``report``          side-by-side comparison of runs (Markdown + PNG plots)

Nothing is imported here, so that light modules (suites, records, metrics) load without JAX.
"""
