"""`flowrl-jax eval` end to end on a tiny random model, resume after a kill, and the scoring
path with hand-written right/wrong responses for every benchmark (real rewards)."""

import json
import shutil

import pytest

from flowrl_jax.data.registry import PACKAGED_DATA_DIR
from flowrl_jax.eval.records import Generation
from flowrl_jax.eval.runner import build_problems, run_eval
from flowrl_jax.eval.suites import KNOWN, SUITES

DATA = PACKAGED_DATA_DIR
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer():
    """Character-level tokenizer with 100 ids (printable ASCII, newline, 4 specials)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from flowrl_jax.checkpoint.hf import export_hf
    from flowrl_jax.testing import tiny_arch, tiny_model

    d = tmp_path_factory.mktemp("tiny_model")
    arch = tiny_arch(128, max_position_embeddings=4096, eos_token_id=2)
    export_hf(tiny_model(arch, scale=1.0), arch, d)
    char_tokenizer().save_pretrained(d)
    return d


def _eval(model_dir, out):
    from flowrl_jax.cli import main

    return main(["eval", "--model", str(model_dir), "--suite", "all", "--limit", "3", "--n", "2",
                 "--max-new-tokens", "8", "--out", str(out), "--data-dir", str(DATA),
                 "--score-workers", "1", "--prefill-buckets", "2048", "--decode-slots", "8",
                 "--decode-chunk", "8", "--no-progress"])


@pytest.mark.slow
def test_eval_end_to_end_and_resume(tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    assert _eval(tiny_model_dir, full) == 0
    lines = (full / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 9 * 3 * 2
    recs = [json.loads(x) for x in lines]
    assert {r["finish_reason"] for r in recs} <= {"stop", "length"}
    assert all(r["score"] in (0.0, 1.0) and 1 <= r["num_tokens"] <= 8 for r in recs)
    summary = json.loads((full / "summary.json").read_text())
    benches = summary["benchmarks"]
    assert list(benches) == list(SUITES["all"])
    for b, s in benches.items():
        assert s["num_problems"] == 3 and s["n"] == 2, b
        assert s["avg_at_n"] <= 0.2, b  # a random 8-token model solves (almost) nothing
        assert set(s["pass_at_k"]) == {"1", "2"}
    assert summary["math_average"]["missing"] == []
    assert set(summary["diversity"]) == {"aime24", "aime25"}
    assert "NOT computed" in summary["codeforces"]["note"]
    assert summary["codeforces"]["num_problems"] == 3
    md = (full / "results.md").read_text()
    assert "Math average (6 benchmarks" in md and "### Codeforces" in md

    # kill simulation: keep 45 finished samples and a torn line, then resume
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "eval_config.json", part / "eval_config.json")
    (part / "samples.jsonl").write_text("\n".join(lines[:45]) + "\n" + lines[45][:30])
    assert _eval(tiny_model_dir, part) == 0
    resumed = json.loads((part / "summary.json").read_text())
    assert resumed["new_samples"] == 54 - 45
    assert resumed["benchmarks"] == benches
    assert sorted((part / "samples.jsonl").read_text().splitlines()) == sorted(lines)

    # the comparison report reads real eval output directories
    from flowrl_jax.cli import main

    assert main(["report", str(full), str(part), "--out", str(tmp_path / "rep")]) == 0
    rep = (tmp_path / "rep" / "report.md").read_text()
    avg = f"{100 * summary['math_average']['value']:.2f}"
    assert f"| **math average (6)** | {avg} | {avg} |" in rep
    assert (tmp_path / "rep" / "pass_at_k_codeforces.png").is_file()
    assert (tmp_path / "rep" / "diversity.png").is_file()


class ScriptedBackend:
    """Sample 0 = a hand-written correct response, sample 1 = a wrong one."""

    def __init__(self, responses):
        self.responses = responses

    def generate(self, prompts, n, seed):
        return [Generation(i, j, self.responses[p][j], 10, "stop")
                for i, p in enumerate(prompts) for j in range(n)]


HAND_CODE = {
    "livecodebench/0": (
        "```python\nn = int(input())\na = list(map(int, input().split()))\n"
        "print(a.index(sorted(a)[-2]) + 1)\n```",
        "```python\nn = int(input())\na = list(map(int, input().split()))\n"
        "print(a.index(max(a)) + 1)\n```"),
    "HumanEval/0": (
        "```python\ndef has_close_elements(numbers, threshold):\n"
        "    for i in range(len(numbers)):\n        for j in range(i + 1, len(numbers)):\n"
        "            if abs(numbers[i] - numbers[j]) < threshold:\n                return True\n"
        "    return False\n```",
        "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"),
    "codeforces/0": (
        "```python\nt = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())\n"
        "    print(min(x, y), max(x, y))\n```",
        "```python\nt = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())\n"
        "    print(x, y)\n```"),
}


def test_scoring_path_hand_written_responses(tmp_path):
    from flowrl_jax.rewards import RewardPool

    probs = build_problems(list(SUITES["math"]) + ["gsm8k"], DATA, 2, lambda s: s)
    probs += build_problems(list(SUITES["code"]), DATA, 1, lambda s: s)
    responses = {}
    for p in probs:
        if p.prompt_id in HAND_CODE:
            responses[p.prompt] = HAND_CODE[p.prompt_id]
        else:
            assert p.benchmark in KNOWN and isinstance(p.ground_truth, str)
            responses[p.prompt] = (f"Some reasoning.\nThe answer is $\\boxed{{{p.ground_truth}}}$."
                                   f"\nAnswer: {p.ground_truth}",
                                   "Some reasoning.\nThe answer is $\\boxed{-987654321}$.\n"
                                   "Answer: -987654321")
    assert {p.prompt_id for p in probs} >= set(HAND_CODE)
    pool = RewardPool(num_workers=2)
    try:
        summary = run_eval(probs, ScriptedBackend(responses), tmp_path, n=2, seed=0,
                                  batch_prompts=4, scorer=pool, config={"model": "scripted"},
                                  diversity_on=(), data_dir=DATA)
    finally:
        pool.close()
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    bad = [(r["benchmark"], r["prompt_id"], r["sample_index"], r["score"]) for r in recs
           if r["score"] != (1.0 if r["sample_index"] == 0 else 0.0)]
    assert bad == []
    assert len(summary["benchmarks"]) == 10
    for b, s in summary["benchmarks"].items():
        assert s["avg_at_n"] == 0.5 and s["pass_at_k"]["2"] == 1.0, b
    assert summary["codeforces"]["solved_first_of_n"] == 1


def test_concurrent_humaneval_parsing_is_thread_safe():
    # Eval scores in RewardPool threads; CPython 3.11's ast.parse raised SystemError when two
    # threads parsed the large HumanEval+ checks at once (seen in the scoring test above).
    import threading

    from flowrl_jax.data.registry import load_eval_set
    from flowrl_jax.rewards import code_reward

    test = load_eval_set("humanevalplus", DATA, limit=1)[0].ground_truth["test"]
    errors, budgets = [], []

    def work():
        for _ in range(5):
            try:
                budgets.append(code_reward.humaneval_budget_s(test))
            except SystemError as e:
                errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(budgets)) == 1 and len(budgets) == 15
