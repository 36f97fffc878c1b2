"""`flowrl-jax sample --json` on a tiny HF directory with a word-level tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from flowrl_jax.cli import main
from flowrl_jax.testing import save_hf_dir, tiny_arch, tiny_model, to_hf, word_tokenizer

EOS = 1


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    arch = tiny_arch(64, eos_token_id=EOS)
    model = tiny_model(arch, seed=4)
    tok = word_tokenizer(64)
    out = tmp_path_factory.mktemp("tiny_hf")
    save_hf_dir(model, arch, str(out), tok)
    return str(out), to_hf(model, arch), tok


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_sample_json_greedy_matches_hf(hf_dir, capsys, tmp_path):
    path, hf, tok = hf_dir
    prompts = ["w1 w2 w3", "w9 w40"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    code, out, err = _run(capsys, ["sample", "--model", path, "--prompts-file", str(f), "--n", "2",
                                   "--temperature", "0", "--max-new-tokens", "10", "--json"])
    assert code == 0, err
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in recs:
        ids = tok.encode(prompts[r["prompt_index"]], add_special_tokens=False)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        ref = ref[0, len(ids):].tolist()
        if EOS in ref:
            ref = ref[:ref.index(EOS) + 1]
        assert r["token_ids"] == ref
        assert r["text"] == tok.decode(ref, skip_special_tokens=True)
        assert len(r["logprobs"]) == len(ref) and all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] == ("stop" if ref[-1] == EOS else "length")


def test_sample_sampling_seed_and_errors(hf_dir, capsys):
    path, _, _ = hf_dir
    argv = ["sample", "--model", path, "--prompt", "w5 w6", "--n", "3", "--temperature", "1.0",
            "--top-k", "20", "--max-new-tokens", "6", "--seed", "3", "--ignore-eos", "--json"]
    code, out1, _ = _run(capsys, argv)
    code2, out2, _ = _run(capsys, argv)
    assert code == code2 == 0 and out1 == out2
    recs = [json.loads(x) for x in out1.splitlines()]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in recs)
    code, _, err = _run(capsys, ["sample", "--model", path, "--prompt", "w1", "--chat"])
    assert code == 2 and "chat template" in err
    code, _, err = _run(capsys, ["sample", "--model", path, "--prompts-file", "/nonexistent/p.txt"])
    assert code == 2 and "/nonexistent/p.txt" in err
    code, _, err = _run(capsys, ["sample", "--model", path, "--prompt", "w1", "--top-p", "0"])
    assert code == 2 and "top_p" in err


def test_shared_sampling_flags_keep_each_commands_defaults_and_order():
    import argparse

    from flowrl_jax.cli import build_parser
    from flowrl_jax.commands.common_args import add_sampling_arguments, sampling_kwargs

    p = argparse.ArgumentParser()
    add_sampling_arguments(p, help={"top_k": "mine"}, top_k=5, temperature=0.5, ignore_eos=False)
    assert [a.dest for a in p._actions[1:]] == ["top_k", "temperature", "ignore_eos"]
    assert {a.dest: a.help for a in p._actions[1:]}["top_k"] == "mine"
    args = p.parse_args(["--temperature", "0", "--ignore-eos"])
    assert sampling_kwargs(args) == {"temperature": 0.0, "top_k": 5, "ignore_eos": True}
    with pytest.raises(KeyError, match="'topp'"):
        add_sampling_arguments(argparse.ArgumentParser(), topp=1.0)
    with pytest.raises(ValueError, match="--ignore-eos is a switch"):
        add_sampling_arguments(argparse.ArgumentParser(), ignore_eos=True)

    # the three commands keep their own defaults (a fixed interface)
    parser = build_parser()
    want = {("eval", "--model", "m", "--out", "o"): dict(temperature=0.6, top_p=0.95, top_k=0,
                                                          max_new_tokens=8192, seed=0),
            ("sample", "--prompt", "x"): dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                                              max_new_tokens=256, seed=0, ignore_eos=False),
            ("serve", "--model", "m"): dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                                            max_new_tokens=512, seed=0, ignore_eos=False)}
    for argv, defaults in want.items():
        assert sampling_kwargs(parser.parse_args(list(argv))) == defaults, argv


def test_sample_serve_eval_share_device_and_dtype_options():
    """sample and serve place the model like eval: --devices auto|1|all, --dtype auto (bf16 on
    accelerators, float32 on CPU)."""
    from flowrl_jax.cli import build_parser
    from flowrl_jax.sampling.devices import resolve_dtype

    parser = build_parser()
    for argv in (("eval", "--model", "m", "--out", "o"), ("sample", "--prompt", "x"),
                 ("serve", "--model", "m")):
        args = parser.parse_args(list(argv))
        assert (args.devices, args.dtype) == ("auto", "auto"), argv
        args = parser.parse_args([*argv, "--devices", "all", "--dtype", "bfloat16"])
        assert (args.devices, args.dtype) == ("all", "bfloat16"), argv
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--devices", "2"])
    assert resolve_dtype("auto") == "float32"  # these tests run on CPU
    assert resolve_dtype("bfloat16") == "bfloat16"
