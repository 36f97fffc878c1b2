"""The benchmark suites `flowrl-jax eval` knows and the parsing of --suite / --diversity."""

from __future__ import annotations

from flowrl_jax.eval.records import EvalError

SUITES: dict[str, tuple[str, ...]] = {
    "math": ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"),
    "code": ("livecodebench", "humanevalplus", "codeforces"),
}
SUITES["all"] = SUITES["math"] + SUITES["code"]
KNOWN = SUITES["all"] + ("gsm8k", "codeforces_heldout")
DIVERSITY_DEFAULT = ("aime24", "aime25")
# The paper's headline "Average" (SPEC §6): unweighted mean of the math suite's Avg@n.
MATH_SIX = SUITES["math"]


def parse_suite(suite: str) -> list[str]:
    """Expand math|code|all|NAME[,NAME...] into benchmark names; unknown names raise."""
    names: list[str] = []
    for part in (p.strip() for p in suite.split(",")):
        if not part:
            continue
        for b in SUITES.get(part, (part,)):
            if b not in KNOWN:
                raise EvalError(f"--suite: unknown benchmark {b!r} (known: {', '.join(KNOWN)}; "
                                f"suites: math, code, all)")
            if b not in names:
                names.append(b)
    if not names:
        raise EvalError("--suite is empty")
    return names


def parse_diversity(spec: str) -> list[str]:
    """Expand --diversity NAME[,NAME] | all | none into benchmark names; unknown names raise."""
    names = (list(KNOWN) if spec == "all" else [] if spec == "none"
             else [d.strip() for d in spec.split(",") if d.strip()])
    unknown = [d for d in names if d not in KNOWN]
    if unknown:
        raise EvalError(f"--diversity: unknown benchmark(s) {unknown} (known: "
                        f"{', '.join(KNOWN)}, or all / none)")
    return names
