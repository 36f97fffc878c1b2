"""Math-Verify worker process: JSON lines in ({"gold", "pred"}) -> JSON lines out ({"score"}).

Runs as a plain script (no package import) so that it starts fast and never pulls in JAX.
Math-Verify's own signal-based timeouts work here because this is a main thread; the parent
adds a hard wall-clock timeout on top and kills this process when it is exceeded.
"""

import json
import sys


def main() -> int:
    """Serve scoring requests until stdin closes."""
    inner_timeout = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_cfg = [LatexExtractionConfig()]
    pred_cfg = [ExprExtractionConfig(), LatexExtractionConfig()]
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            gold = parse(req["gold"], extraction_config=gold_cfg, parsing_timeout=inner_timeout)
            pred = parse(req["pred"], extraction_config=pred_cfg, parsing_timeout=inner_timeout)
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=inner_timeout)
            resp = {"score": 1.0 if ok else 0.0}
        except Exception as exc:  # a grader error is a wrong answer, not a crash
            resp = {"score": 0.0, "error": f"{type(exc).__name__}: {exc}"[:500]}
        out.write(json.dumps(resp) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
