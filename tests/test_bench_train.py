"""`flowrl-jax bench train`: the FLOP count against a hand count, the fixed JSON keys of a
real (one-step, tiny) run, and a clear error for an unknown shape."""

from __future__ import annotations

import argparse
import json

import pytest

from flowrl_jax.bench import train as bench


def test_step_flops_matches_a_hand_count_for_the_tiny_shape():
    arch = bench._arch("tiny")  # hidden 64, mlp 128, 2 layers, 4 heads × 16, 2 kv heads, vocab 128
    b, p, r = 4, 256, 256
    t = p + r
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v; gate, up, down
    expected = (6 * 2 * per_layer * b * t          # body, every token
                + 6 * 64 * 128 * b * r             # LM head, response tokens only
                + 12 * 2 * 4 * 16 * t * b * t      # attention scores and values
                + 6 * (2 * 64 * 64 + 64) * b)      # Z_φ (depth 2)
    assert bench.step_flops(arch, b, p, r) == expected


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="'huge'"):
        bench.run(argparse.Namespace(shapes="tiny,huge"))


def test_one_tiny_step_reports_the_fixed_keys(capsys):
    from flowrl_jax.commands import bench as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["train", "--shapes", "tiny", "--steps", "1", "--no-reference",
                              "--json"])
    assert command.run(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert row["shape"] == "tiny" and row["unit"] == "tokens/s"
    assert row["ours"] > 0 and row["ours_ok"] is True
    assert row["reference"] is None and row["ratio"] is None  # --no-reference
    assert row["ours"] == pytest.approx(row["batch"] * row["seq"] / row["ours_step_s"])
