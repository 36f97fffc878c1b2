"""scripts/gpu_check.sh without a GPU: it parses, its dry run lists the decode stages at
batch 64 and 256 for the 0.5B and 7B shapes within the 8-minute budget, and every bench
command it would run is accepted by the CLI's parser."""

from __future__ import annotations

import os
import shlex
import subprocess

from flowrl_jax import cli

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.sh")


def _dry(tmp_path, **env) -> dict[str, tuple[int, str]]:
    out = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), **env}).stdout
    stages = {}
    for line in out.splitlines():
        if line.startswith("DRY "):
            head, cmd = line[4:].split(": ", 1)
            name, limit = head.split()
            stages[name] = (int(limit), cmd)
    return stages


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_decode_stages_fit_the_budget_and_parse(tmp_path):
    stages = _dry(tmp_path)
    assert list(stages) == ["env", "decode_small", "decode_large"]
    assert sum(limit for limit, _ in stages.values()) <= 8 * 60
    parser = cli.build_parser()
    shapes = {}
    for name in ("decode_small", "decode_large"):
        words = shlex.split(stages[name][1])
        args = parser.parse_args(words[words.index("flowrl_jax.cli") + 1:])
        assert args.bench == "sample" and args.batches == "64,256" and args.json
        shapes[args.shapes] = args.no_reference
    assert shapes == {"qwen2.5-0.5b": False, "qwen2.5-7b": True}  # HF beside the 0.5B only


def test_every_stage_command_parses_and_the_budget_cuts_limits(tmp_path):
    stages = _dry(tmp_path, STAGES="env attention train decode_small")
    parser = cli.build_parser()
    for name in ("attention", "train", "decode_small"):
        words = shlex.split(stages[name][1])
        parser.parse_args(words[words.index("flowrl_jax.cli") + 1:])
    cut = _dry(tmp_path, BUDGET_S="100")
    assert cut["env"][0] == 25 and cut["decode_small"][0] <= 100
    bad = subprocess.run(["bash", SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "STAGES": "nope"})
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stdout
