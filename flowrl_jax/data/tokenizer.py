"""The packaged Qwen2.5 tokenizer (no ../shared needed at run time) and tokenizer loading."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

PACKAGED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer" / "qwen2.5"

# Ids of the Qwen2.5 special tokens (the 22 added tokens start at 151643).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer  # local import: transformers is slow to import

    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(path: Optional[Union[str, Path]] = None) -> Any:
    """A HF tokenizer from `path` (a directory), or the packaged Qwen2.5 one when None.

    Loads are cached per path within a process; padding is set to the left (prompts).
    """
    p = Path(path).expanduser() if path else PACKAGED_TOKENIZER
    if not p.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {p}")
    tok = _load(str(p.resolve()))
    if tok.pad_token_id is None:
        # Qwen checkpoints pad with <|endoftext|>; fall back to eos for other tokenizers.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer_for(tokenizer_dir: Optional[str]) -> Any:
    """The model's tokenizer, or the packaged Qwen2.5 one when the model dir has none.

    A generic `tokenizer.json` tokenizer next to a Qwen2 config.json is loaded as what it is:
    AutoTokenizer would pick Qwen2Tokenizer from the model type and re-tokenise wrongly."""
    if tokenizer_dir:
        d = Path(tokenizer_dir)
        cfg_file = d / "tokenizer_config.json"
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
        if cls in _GENERIC_CLASSES and (d / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast  # local: transformers is slow to import

            tok = PreTrainedTokenizerFast.from_pretrained(str(d))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"
            return tok
    return load_tokenizer(tokenizer_dir)
