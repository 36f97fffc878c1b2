"""The real Qwen2.5 tokenizer (shared copy and the packaged copy) loads and encodes correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen2.5-tokenizer"
DIRS = [pytest.param(PACKAGED_TOKENIZER, id="packaged"), pytest.param(SHARED, id="shared")]


@pytest.mark.parametrize("path", DIRS)
def test_qwen25_tokenizer_encodes_reference_ids(path):
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    text = "Solve 2x + 3 = 7. Answer: x = 2 ∎"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_packaged_copy_tokenizes_like_shared():
    if not SHARED.exists():
        pytest.skip("shared data not on this machine")
    for f in ("vocab.json", "merges.txt"):
        assert (PACKAGED_TOKENIZER / f).read_bytes() == (SHARED / f).read_bytes(), f
    a, b = AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER)), AutoTokenizer.from_pretrained(str(SHARED))
    for text in ("<|im_start|>user\nWhat is 1+1?<|im_end|>\n", "  def f(x):\n\treturn x**2  # ü"):
        assert a(text)["input_ids"] == b(text)["input_ids"]
