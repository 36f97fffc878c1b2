"""The JAX sampling engine behind the evaluation Backend protocol (token ids in, text out)."""

from __future__ import annotations

from typing import Any, Sequence

from flowrl_jax.config import ModelConfig
from flowrl_jax.data.templates import ChatRenderer
from flowrl_jax.eval.records import EvalError, Generation, Problem
from flowrl_jax.sampling.devices import resolve_dtype, sampling_mesh
from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams
from flowrl_jax.checkpoint.load import load_for_sampling
from flowrl_jax.data.tokenizer import load_tokenizer_for

# the shared placement helpers, under the names eval used first
eval_mesh = sampling_mesh
__all__ = ["EngineBackend", "eval_mesh", "resolve_dtype"]


class EngineBackend:
    """The JAX sampling engine behind the Backend protocol (token ids in, decoded text out)."""

    def __init__(self, model_dir: str, *, temperature: float, top_p: float, top_k: int,
                 max_new_tokens: int, dtype: str = "float32", decode_slots: int = 256,
                 decode_chunk: int = 64, devices: str = "auto",
                 prefill_buckets: Sequence[int] | None = None, kv_cache: str = "paged",
                 page_size: int = 64, kv_cache_gib: float | None = None):
        self.mesh = eval_mesh(devices)
        self.model, self.arch, tok_dir = load_for_sampling(
            model_dir, self.mesh, ModelConfig(path=model_dir, compute_dtype=dtype))
        self.tokenizer = load_tokenizer_for(tok_dir)
        self.tokenizer_dir = tok_dir
        self.render = ChatRenderer(self.tokenizer)
        # Stop at the model's EOS, the tokenizer's EOS and Qwen's chat end-of-turn token.
        eos = {t for t in (self.arch.eos_token_id, self.tokenizer.eos_token_id) if t is not None}
        unk = self.tokenizer.unk_token_id
        for name in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != unk and 0 <= tid < self.arch.vocab_size:
                eos.add(tid)
        buckets = tuple(prefill_buckets or (
            b for b in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
            if b <= self.arch.max_position_embeddings)) or (128,)
        self.engine = SamplingEngine(self.model, mesh=self.mesh, decode_slots=decode_slots,
                                     decode_chunk=decode_chunk, prefill_buckets=buckets,
                                     eos_token_ids=sorted(eos),
                                     pad_token_id=self.tokenizer.pad_token_id or 0, verbose=False,
                                     kv_cache=kv_cache, page_size=page_size,
                                     kv_cache_gib=kv_cache_gib)
        self.max_new_tokens = max_new_tokens
        self.settings = dict(temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=max_new_tokens)

    def encode(self, user_message: str) -> list[int]:
        """Chat-templated prompt token ids."""
        return self.tokenizer.encode(self.render(user_message), add_special_tokens=False)

    def check_lengths(self, problems: Sequence[Problem]) -> None:
        """Refuse prompts that cannot fit the model's context up front, naming them."""
        limit = self.arch.max_position_embeddings
        bad = [f"{p.prompt_id} ({len(p.prompt)} tokens)" for p in problems
               if len(p.prompt) + self.max_new_tokens > limit]
        if bad:
            raise EvalError(f"{len(bad)} prompt(s) + --max-new-tokens {self.max_new_tokens} exceed "
                            f"the model's max_position_embeddings {limit}: {', '.join(bad[:5])}"
                            f"{' …' if len(bad) > 5 else ''}; lower --max-new-tokens")

    def generate(self, prompts: Sequence[Any], n: int, seed: int) -> list[Generation]:
        """Sample n responses per prompt in one engine call."""
        sp = SamplingParams(n=n, seed=seed, **self.settings)
        ro = self.engine.generate(self.model, [list(p) for p in prompts], sp)
        out = []
        for r in range(len(ro.lengths)):
            ids = ro.tokens[r, :int(ro.lengths[r])].tolist()
            out.append(Generation(int(ro.prompt_index[r]), int(ro.sample_index[r]),
                                  self.tokenizer.decode(ids, skip_special_tokens=True),
                                  int(ro.lengths[r]), str(ro.finish_reasons[r])))
        return out
